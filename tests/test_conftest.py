"""The test setup's own rule: which triton / numpy pairs cannot run the Triton interpreter."""
from tests.conftest import _interpreter_numpy_problem


def test_interpreter_numpy_rule():
    assert "numpy<2.4" in _interpreter_numpy_problem("3.6.0", "2.4.6")
    assert "triton 3.5.1" in _interpreter_numpy_problem("3.5.1", "2.5.0")
    for triton_version, numpy_version in (("3.6.0", "2.3.5"), ("3.7.0", "2.4.6"), ("3.9.0", "2.4.0"),
                                          ("3.10.0+git1234", "3.0.0")):
        assert _interpreter_numpy_problem(triton_version, numpy_version) is None
