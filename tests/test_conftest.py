"""Which tests a session skips: interpreter tests on a GPU machine, GPU tests without one."""
from tests.conftest import skip_reason


def test_without_a_gpu_only_gpu_tests_skip():
    assert skip_reason({"triton"}, has_cuda=False, interpreting=True) is None
    assert skip_reason({"triton", "aot"}, has_cuda=False, interpreting=True) is None
    assert skip_reason(set(), has_cuda=False, interpreting=True) is None
    assert "CUDA" in skip_reason({"gpu"}, has_cuda=False, interpreting=True)


def test_on_a_gpu_machine_interpreter_tests_skip_with_the_command_that_runs_them():
    reason = skip_reason({"triton"}, has_cuda=True, interpreting=False)
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    # Compiles ahead of time, GPU tests and plain tests still run there.
    assert skip_reason({"triton", "aot"}, has_cuda=True, interpreting=False) is None
    assert skip_reason({"gpu", "triton"}, has_cuda=True, interpreting=False) is None
    assert skip_reason(set(), has_cuda=True, interpreting=False) is None


def test_interpreter_forced_on_a_gpu_machine_runs_them():
    assert skip_reason({"triton"}, has_cuda=True, interpreting=True) is None
