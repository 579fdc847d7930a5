"""The Triton tests' skip reason says what is missing: Triton itself, or its interpreter on CPU."""

import triton_skip


def test_without_triton_the_reason_says_it_is_not_installed(monkeypatch):
    monkeypatch.setattr(triton_skip, "HAS_TRITON", False)
    reason = triton_skip.triton_skip_reason("cpu")
    assert reason.startswith("Triton is not installed (pip install 'ramnet[triton]'") and "INTERPRET" not in reason


def test_with_triton_on_cpu_the_reason_names_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_skip, "HAS_TRITON", True)
    monkeypatch.setattr(triton_skip, "interpreting", lambda: False)
    assert "Triton is installed, but on CPU" in triton_skip.triton_skip_reason("cpu")
    assert "TRITON_INTERPRET=1" in triton_skip.triton_skip_reason("cpu")
    monkeypatch.setattr(triton_skip, "interpreting", lambda: True)
    monkeypatch.setattr(triton_skip, "triton_runs_on", lambda device: True)
    assert triton_skip.triton_skip_reason("cpu") is None
