"""Evaluation of CoNRec: the harness, the ``conrec-eval`` CLI and the deployment-filter batch CLI.

* ``python -m conrec_verl.evaluation --data DIR --out DIR [--model NAME=HF_DIR] [--predictions NAME=FILE]``
* ``python -m conrec_verl.evaluation.filter_cli --data DIR --predictions FILE --candidates FILE --out FILE``

Library: :func:`conrec_verl.evaluation.harness.run_evaluation`.
"""
