"""Upstream contracts: private megatron-core API we override or mirror, checked like patches."""

from __future__ import annotations

import inspect

import pytest
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megatron_longvita.parallel.attention import CachedRingAttention, RingDotProductAttention
from megatron_longvita.patches import contracts
from megatron_longvita.patches.contracts import (
    CONTRACTS,
    DOT_PRODUCT_ATTENTION,
    ContractBrokenError,
    ContractVersionError,
    UpstreamContract,
    check_contract,
    parameter_names,
)


def test_every_contract_holds_on_the_installed_megatron() -> None:
    assert {"gpt-model-postprocess", "transformer-layer-bias-dropout-add", "dot-product-attention-signature"} <= set(
        CONTRACTS
    )
    for contract in CONTRACTS.values():
        check_contract(contract)


def test_ring_attention_mirrors_the_declared_dot_product_attention_signature() -> None:
    """Ours = upstream's constructor plus the keyword-only block kernel; forward identical."""
    declared = dict(DOT_PRODUCT_ATTENTION.signatures)
    init = declared["megatron.core.transformer.dot_product_attention.DotProductAttention.__init__"]
    forward = declared["megatron.core.transformer.dot_product_attention.DotProductAttention.forward"]
    assert parameter_names(RingDotProductAttention.__init__) == (*init, "kernel")
    assert (
        inspect.signature(RingDotProductAttention.__init__).parameters["kernel"].kind is inspect.Parameter.KEYWORD_ONLY
    )
    assert parameter_names(RingDotProductAttention.forward) == forward
    assert parameter_names(CachedRingAttention.forward) == forward
    assert parameter_names(DotProductAttention.forward) == forward


def test_megatron_outside_the_verified_range_fails_naming_the_contract(monkeypatch) -> None:
    from packaging.version import Version

    monkeypatch.setattr(contracts, "installed_version", lambda distribution: Version("0.17.0"))
    monkeypatch.setattr(contracts, "_VERIFIED", set())
    with pytest.raises(ContractVersionError, match="'gpt-model-postprocess'.*megatron-core 0.17.0"):
        contracts.require("gpt-model-postprocess")
    # and where the code relies on it: building the headed model refuses before megatron runs
    from megatron_longvita.models.heads import HeadedGPTModel

    with pytest.raises(ContractVersionError, match="gpt-model-postprocess"):
        HeadedGPTModel(config=None, transformer_layer_spec=None, vocab_size=8, max_sequence_length=8)


def test_a_changed_signature_breaks_the_contract() -> None:
    changed = UpstreamContract(
        "test-signature",
        "tests",
        "test",
        signatures=(
            (
                "megatron.core.transformer.dot_product_attention.DotProductAttention.forward",
                ("self", "query", "key", "value"),
            ),
        ),
    )
    with pytest.raises(ContractBrokenError, match="test-signature.*DotProductAttention.forward takes"):
        check_contract(changed)


def test_a_call_no_longer_made_breaks_the_contract() -> None:
    changed = UpstreamContract(
        "test-call",
        "tests",
        "test",
        calls=(
            (
                "megatron.core.transformer.transformer_layer.TransformerLayer._forward_attention",
                ("self.self_attn_bda(self.training, fused=True)",),
            ),
        ),
    )
    with pytest.raises(ContractBrokenError, match="test-call.*no longer calls"):
        check_contract(changed)
