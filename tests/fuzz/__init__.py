"""Property-based fuzzing of ecospa_fx over generated transformer architectures (issue 8).

* ``generator.py``: the ``Spec`` of a random tiny transformer, ``build(spec)`` and the hypothesis strategy
  ``specs()``; the generator knows the ground truth (groups per kind, protected channels).
* ``properties.py``: the checks (mask oracle, zero-sparsity identity, ground-truth group counts, renaming,
  ONNX parity) and the known bugs they tolerate until fixed.
* ``test_fuzz_architectures.py``: CI-size run (fixed seed, ~20 examples); nightly with
  ``ECOSPA_FUZZ_EXAMPLES=2000`` (and optionally ``ECOSPA_FUZZ_SEED``).
* ``test_adversarial.py``: hand-written adversarial models; ``test_regressions.py``: minimal repros of
  the bugs the fuzzer found.
* ``python -m tests.fuzz.explore --examples N --seed S``: run many examples without stopping at the first
  failure (for hunting bugs; no shrinking).
"""
