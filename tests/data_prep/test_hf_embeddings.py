"""The `hf` embedding method with a tiny, randomly initialised local encoder (nothing downloaded)."""

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from conrec_verl.data_prep import DataPrepError  # noqa: E402
from conrec_verl.data_prep.embeddings import hf_embeddings  # noqa: E402


def tiny_encoder(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "action", "comedy", "movie", "drama", "1", "2", "3"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(folder)
    cfg = BertConfig(vocab_size=len(words), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=32)
    import torch

    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(folder)


def test_hf_mean_pooled_embeddings(tmp_path):
    tiny_encoder(tmp_path / "enc")
    texts = ["action movie 1", "comedy movie 2", "action movie 1", "drama"]
    v = hf_embeddings(texts, str(tmp_path / "enc"), batch_size=3)
    assert v.shape == (4, 8) and v.dtype == np.float32 and np.isfinite(v).all()
    np.testing.assert_allclose(v[0], v[2], rtol=1e-5)  # same text, same vector (padding masked out)
    assert not np.allclose(v[0], v[1])
    with pytest.raises(DataPrepError, match="local model folder"):
        hf_embeddings(texts, str(tmp_path / "missing"))


def test_hf_method_in_the_pipeline(tmp_path):
    from conrec_verl.data_prep import build, load_config
    from dp_helpers import write_movielens

    tiny_encoder(tmp_path / "enc")
    write_movielens(tmp_path / "ml")
    out = build(load_config("movielens", [f"input.path={tmp_path / 'ml'}", f"out_dir={tmp_path / 'o'}",
                                          "sid.sizes=[4,4,4]", "embedding.method=hf",
                                          f"embedding.hf_model_path={tmp_path / 'enc'}", "progress=false",
                                          "print_summary=false"]))
    import pandas as pd

    from conrec_verl.core.sid import Codebook

    sm = pd.read_parquet(out / "sid_map.parquet")
    assert sm.sid.is_unique and (sm.source == "content").all()
    assert Codebook.load(out / "codebook.npz").dim == 8  # the encoder's hidden size
