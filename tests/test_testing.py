import pytest
import torch

from molf.testing import count_host_syncs


def test_counts_each_kind_of_host_read():
    t = torch.arange(4.0)
    with count_host_syncs() as syncs:
        t.sum().item()
        t.tolist()
        t.cpu()
        t.to("cpu")
        bool(t[0] > 0)
        float(t[1])
        int(t[2])
        t[t > 1]
        torch.nonzero(t)
        t.masked_select(t > 0)
    assert syncs.calls == {
        "Tensor.item": 1, "Tensor.tolist": 1, "Tensor.cpu": 1, "Tensor.to(cpu)": 1, "Tensor.__bool__": 1,
        "Tensor.__float__": 1, "Tensor.__int__": 1, "Tensor.__getitem__(bool mask)": 1, "torch.nonzero": 1,
        "Tensor.masked_select": 1,
    }
    assert syncs.count == 10


def test_device_side_ops_are_not_counted():
    t = torch.randn(8)
    with count_host_syncs() as syncs:
        torch._foreach_mul_([t], 2.0)
        t[torch.tensor([0, 3])].sum()
        torch.where(t > 0, t, 0.0)
        t.to(torch.float64)
    assert syncs.count == 0


def test_methods_restored_even_after_an_error():
    before = (torch.Tensor.item, torch.Tensor.to, torch.nonzero)
    with pytest.raises(RuntimeError):
        with count_host_syncs():
            raise RuntimeError("boom")
    assert (torch.Tensor.item, torch.Tensor.to, torch.nonzero) == before
    assert "item" not in vars(torch.Tensor)
