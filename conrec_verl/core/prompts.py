"""Prompt texts of every CoNRec task, in one place.

data_prep renders SFT/RL/eval rows with these functions and the verl dataset adapter re-renders
RL prompts per progressive stage with the same functions, so the two cannot drift. The tiny test
tokenizer is built from :func:`vocabulary_corpus` so every word here is a known token.

Histories are lists of SID strings, oldest first. Truncation (to fit a token budget) always drops
the *oldest* items and never the instruction.
"""

from __future__ import annotations

from typing import Callable, Sequence

STAGE_CONTEXTS = {
    1: "recent negatives (last 3 days)",
    2: "all negatives",
    3: "negatives and positives",
}

INSTRUCTION = "Predict one item the user will mark not interested in the next days. Answer with its item ID only."
#: the question of the optional like rows of warm-up SFT (``sft.warmup.likes``): the same history
#: prompt asking for an item the user will like (item-sequence knowledge from the more frequent
#: likes). Not in :func:`vocabulary_corpus`, so that tokenizers built before it stay the same; the
#: byte-level tiny tokenizer spells its new word from known pieces.
LIKE_INSTRUCTION = "Predict one item the user will like in the next days. Answer with its item ID only."
NEG_RECENT_HEADER = "Items the user marked not interested in the last 3 days:"
NEG_ALL_HEADER = "Items the user marked not interested:"
POS_HEADER = "Items the user liked:"
EMPTY = "none"

ALIGN_TEMPLATE = (
    "The user marked one of these items not interested and liked the others: {options}. "
    "Which item did the user mark not interested? Answer with its item ID only."
)
TITLE_TO_SID_TEMPLATE = "Which item ID has the title: {title}? Answer with its item ID only."
SID_TO_TITLE_TEMPLATE = "What is the title of the item {sid}?"

OPTION_LETTERS = "ABCD"


def _join(items: Sequence[str]) -> str:
    return " ".join(items) if len(items) else EMPTY


def _sections(stage: int, neg_recent: Sequence[str], neg_all: Sequence[str], pos: Sequence[str]):
    if stage == 1:
        return [(NEG_RECENT_HEADER, list(neg_recent))]
    if stage == 2:
        return [(NEG_ALL_HEADER, list(neg_all))]
    if stage == 3:
        return [(NEG_ALL_HEADER, list(neg_all)), (POS_HEADER, list(pos))]
    raise ValueError(f"unknown progressive stage {stage!r}; expected 1, 2 or 3")


def render_history_prompt(
    stage: int,
    neg_recent: Sequence[str] = (),
    neg_all: Sequence[str] = (),
    pos: Sequence[str] = (),
    fits: Callable[[str], bool] | None = None,
    instruction: str = INSTRUCTION,
) -> str:
    """The user-turn text for a history -> future negative prompt at ``stage`` (``instruction``: the
    question after the history; :data:`LIKE_INSTRUCTION` for the warm-up like rows).

    ``fits(text) -> bool`` (e.g. "tokenised length <= max_prompt_length") makes the function drop
    the oldest history items, largest section first, until the text fits. The instruction is never
    cut; if even empty histories do not fit, the prompt with empty histories is returned.
    """
    sections = _sections(stage, neg_recent, neg_all, pos)

    def render(secs) -> str:
        lines = [f"{header} {_join(items)}" for header, items in secs]
        return "\n".join(lines + [instruction])

    text = render(sections)
    if fits is None or fits(text):
        return text
    # Binary search on how many oldest items to drop, always dropping from the longest section.
    total = sum(len(items) for _, items in sections)

    def dropped(k: int):
        secs = [(h, list(items)) for h, items in sections]
        for _ in range(k):
            longest = max(range(len(secs)), key=lambda i: len(secs[i][1]))
            if not secs[longest][1]:
                break
            secs[longest][1].pop(0)
        return secs

    lo, hi = 1, total
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(render(dropped(mid))):
            hi = mid
        else:
            lo = mid + 1
    return render(dropped(lo))


def chat_prompt_length(tokenizer, text: str, template_kwargs: dict | None = None) -> int:
    """Tokens of ``text`` as one user turn with the tokenizer's chat template and generation prompt
    (plain text when the tokenizer has no template): the length verl's RL dataset checks against
    ``data.max_prompt_length`` and the evaluation's token budget counts."""
    if getattr(tokenizer, "chat_template", None):
        kwargs = dict(template_kwargs or {})
        for k in ("tokenize", "return_dict", "return_tensors", "add_generation_prompt"):
            kwargs.pop(k, None)
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False, **kwargs)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def budget_fits(tokenizer, max_tokens: int | None, template_kwargs: dict | None = None) -> Callable[[str], bool] | None:
    """The ``fits`` test of :func:`render_history_prompt` for a token budget (None: no budget)."""
    if max_tokens is None:
        return None
    limit = int(max_tokens)
    return lambda text: chat_prompt_length(tokenizer, text, template_kwargs) <= limit


def render_alignment_prompt(options: Sequence[str]) -> str:
    """4-way item-level alignment: ``options`` are SID strings (one disliked, three liked)."""
    parts = [f"{OPTION_LETTERS[i]}: {sid}" for i, sid in enumerate(options)]
    return ALIGN_TEMPLATE.format(options=" ".join(parts))


def render_title_to_sid_prompt(title: str) -> str:
    return TITLE_TO_SID_TEMPLATE.format(title=title)


def render_sid_to_title_prompt(sid: str) -> str:
    return SID_TO_TITLE_TEMPLATE.format(sid=sid)


def vocabulary_corpus() -> list[str]:
    """Every fixed text the prompts use (for building a tokenizer that knows them)."""
    texts = [INSTRUCTION, NEG_RECENT_HEADER, NEG_ALL_HEADER, POS_HEADER, EMPTY,
             ALIGN_TEMPLATE.format(options=" ".join(f"{x}:" for x in OPTION_LETTERS)),
             TITLE_TO_SID_TEMPLATE.format(title=""), SID_TO_TITLE_TEMPLATE.format(sid="")]
    return texts
