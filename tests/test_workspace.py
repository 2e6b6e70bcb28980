"""vlfast._workspace: per-thread scratch buffers reused between calls."""
import threading

import torch

from vlfast import _workspace


def test_a_buffer_is_reused_grown_and_kept_per_thread():
    a = _workspace.buffer("test.a", 100, torch.float32, "cpu")
    assert a.shape == (100,) and a.dtype == torch.float32
    assert _workspace.buffer("test.a", 50, torch.float32, "cpu").data_ptr() == a.data_ptr()  # smaller: reused
    grown = _workspace.buffer("test.a", 200, torch.float32, "cpu")
    assert grown.numel() == 200 and grown.data_ptr() != a.data_ptr()
    assert _workspace.buffer("test.a", 200, torch.float64, "cpu").dtype == torch.float64  # other dtype: new
    assert _workspace.buffer("test.b", 200, torch.float64, "cpu").data_ptr() != \
        _workspace.buffer("test.a", 200, torch.float64, "cpu").data_ptr()  # names never share
    other = []
    t = threading.Thread(target=lambda: other.append(_workspace.buffer("test.a", 200, torch.float64, "cpu")))
    t.start()
    t.join()
    assert other[0].data_ptr() != _workspace.buffer("test.a", 200, torch.float64, "cpu").data_ptr()


def test_a_matrix_views_the_named_buffer():
    m = _workspace.matrix("test.m", 3, 7, torch.float32, "cpu")
    assert m.shape == (3, 7) and m.is_contiguous()
    assert _workspace.buffer("test.m", 21, torch.float32, "cpu").data_ptr() == m.data_ptr()
    assert _workspace.matrix("test.m", 7, 3, torch.float32, "cpu").shape == (7, 3)


def test_a_storage_is_reused_only_once_nothing_holds_it():
    s = _workspace.storage("test.s", 64, "cpu")
    assert s.nbytes() == 64
    assert _workspace.storage("test.s", 64, "cpu").data_ptr() == s.data_ptr()  # nothing else holds it
    t = torch.empty(0, dtype=torch.float32).set_(s, 0, (16,), (1,))
    view = t[3:]
    del t
    busy = _workspace.storage("test.s", 64, "cpu")  # a view still holds it: a fresh one
    assert busy.data_ptr() != s.data_ptr()
    del view
    assert _workspace.storage("test.s", 32, "cpu").nbytes() == 32  # another size: fresh
    other = []
    th = threading.Thread(target=lambda: other.append(_workspace.storage("test.s", 32, "cpu").data_ptr()))
    th.start()
    th.join()
    assert other[0] != _workspace.storage("test.s", 32, "cpu").data_ptr()  # kept per thread
