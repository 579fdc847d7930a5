"""benchmarks/lm_address_stats.py measures how sharp a RAM-Net's addresses are."""

import importlib.util
from pathlib import Path

import pytest
import torch

from ramnet.models import RAMNetConfig, RAMNetForCausalLM

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lm_address_stats.py"
spec = importlib.util.spec_from_file_location("lm_address_stats", SCRIPT)
lm_address_stats = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lm_address_stats)


def model(log_scale: float) -> RAMNetForCausalLM:
    torch.manual_seed(0)
    m = RAMNetForCausalLM(RAMNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2, head_v_dim=8,
                                       num_partitions=2, partition_dim=4, topk=3, intermediate_size=64,
                                       num_cape_heads=[2, 0]))
    with torch.no_grad():
        for layer in m.model.layers:
            layer.attn.q_log_scale.fill_(log_scale)
            layer.attn.k_log_scale.fill_(log_scale)
    return m.eval()


def test_sharper_temperatures_give_sharper_addresses_and_the_model_is_left_as_it_was():
    ids = torch.randint(0, 64, (2, 40))
    flat, sharp = (lm_address_stats.address_stats(model(s), ids) for s in (0.0, 4.0))
    assert len(flat) == 4 and [(r["layer"], r["head"], r["cape"]) for r in flat] == [
        (0, 0, True), (0, 1, True), (1, 0, False), (1, 1, False)]
    for f, s in zip(flat, sharp):
        assert s["q_scale"] == pytest.approx(torch.e ** 4) and f["k_scale"] == 1.0
        assert 0 < f["read_top1"] < f["read_mass"] <= 1 and 0 < f["write_top1"] < f["write_mass"] <= 1
        assert s["read_top1"] > f["read_top1"] + 0.2 and s["write_mass"] > f["write_mass"]
        assert 0 < f["slots_written"] <= 1
    m = model(0.0)
    before = m(input_ids=ids).logits
    lm_address_stats.address_stats(m, ids)
    assert "run" not in vars(m.model.layers[0].attn.memory)  # the capture is undone
    assert torch.equal(m(input_ids=ids).logits, before)
    layers = lm_address_stats.per_layer(flat)
    assert [r["cape_heads"] for r in layers] == [2, 0]
    assert layers[1]["read_top1"] == pytest.approx((flat[2]["read_top1"] + flat[3]["read_top1"]) / 2)
    assert "| 1 | 0/2 |" in lm_address_stats.table(layers, "x")
