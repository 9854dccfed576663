"""Tests for service/engine/lora.py and lora_model.py: the multi-LoRA math against a per-row reference
and against PEFT on tiny GPT-2 (Conv1D), Llama and BERT models built in-process.
"""

from __future__ import annotations

import pytest
import torch
from factories import randomize_peft
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from adapters.peft import LoraModule
from service.engine.lora import MultiLoraLinear, SlotState, copy_transposed, group_rows, lora_delta_reference
from service.engine.lora_model import inject_multi_lora, matches_target
from service.engine.packed_linear import pack_block_linears

torch.manual_seed(0)


def _random_slots(module: MultiLoraLinear, ranks: dict[int, int]) -> None:
    for slot, r in ranks.items():
        module.load_slot(slot, LoraModule(torch.randn(r, module.in_features), torch.randn(module.out_features, r), 0.5))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("shape", [(5, 7), (5, 3), (5,)])  # [B, T, in] (T >= and < r_max) and [N, in]
# Mixed over a dense slot range (grouped bmm), mixed over a sparse one (gathered bmm), uniform, all base.
@pytest.mark.parametrize("slot_ids", [[0, 1, 2, 1, 3], [3, 0, 0, 0, 0], [2, 2, 2, 2, 2], [0, 0, 0, 0, 0]])
def test_multi_lora_linear_matches_reference(kind: str, shape: tuple[int, ...], slot_ids: list[int]) -> None:
    base = nn.Linear(12, 10) if kind == "linear" else Conv1D(10, 12)
    nn.init.normal_(base.bias)
    state = SlotState()
    layer = MultiLoraLinear(base, state, num_slots=4, max_rank=6)
    _random_slots(layer, {1: 2, 2: 6, 3: 4})
    x = torch.randn(*shape, 12)
    ids = torch.tensor(slot_ids)
    state.set(ids)
    assert (state.groups is not None) == (slot_ids == [0, 1, 2, 1, 3])  # grouped where rows are < r_max tokens
    with torch.no_grad():
        got = layer(x)
        want = base(x) + lora_delta_reference(x, ids, layer.lora_A, layer.lora_B)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if not any(slot_ids):
        assert torch.equal(got, base(x))  # skipped entirely, bit-exact


def test_group_rows_layout() -> None:
    groups = group_rows(torch.tensor([3, 1, 3, 2, 1]), [1, 2, 3])
    assert (groups.lo, groups.count, groups.width) == (1, 3, 2)
    # slot 1 owns padded rows 0-1, slot 2 rows 2-3, slot 3 rows 4-5; arrival order kept within a slot
    assert groups.index.tolist() == [4, 0, 5, 2, 1]
    assert group_rows(torch.tensor([1, 9, 9, 9]), [1, 9]) is None  # 9 slots x 3 rows > 2 x 4 rows


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_laid_out_rows_match_reference(kind: str) -> None:
    """Rows the caller scattered into the groups' padded layout (what the model runner does in decode)
    get the same result as rows in batch order; padding rows are accepted and ignored."""
    base = nn.Linear(12, 10) if kind == "linear" else Conv1D(10, 12)
    state = SlotState()
    layer = MultiLoraLinear(base, state, num_slots=4, max_rank=6)
    _random_slots(layer, {1: 2, 2: 6, 3: 4})
    ids = torch.tensor([3, 1, 3, 2, 1])
    x = torch.randn(5, 1, 12)
    state.set(ids, laid_out=True)
    assert state.laid_out and state.rows == 6  # 3 slots x 2 rows: one padding row (slot 2's second)
    padded = x.new_zeros(6, 1, 12).index_copy_(0, state.groups.index, x)
    with torch.no_grad():
        got = layer(padded).index_select(0, state.groups.index)
        want = base(x) + lora_delta_reference(x, ids, layer.lora_A, layer.lora_B)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="6 rows"):
            layer(x)  # rows in batch order while the layout was promised
    state.set(torch.tensor([1, 1, 1]), laid_out=True)  # uniform: no layout needed, none granted
    assert not state.laid_out and state.rows == 3


def test_load_folds_scale_and_pads_rank() -> None:
    layer = MultiLoraLinear(nn.Linear(8, 6), SlotState(), num_slots=2, max_rank=4)
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    layer.load_slot(1, LoraModule(A, B, 2.0))
    x = torch.randn(3, 8)
    torch.testing.assert_close(x @ layer.lora_A[1] @ layer.lora_B[1], 2.0 * (x @ A.t() @ B.t()))
    assert not layer.lora_A[1, :, 2:].any() and not layer.lora_B[1, 2:].any()
    assert not layer.lora_A[0].any() and not layer.lora_B[0].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # numpy path / torch path
@pytest.mark.parametrize("scale", [None, 0.37])
def test_copy_transposed_matches_torch(dtype: torch.dtype, scale: float | None) -> None:
    src = torch.randn(3, 5).to(dtype)
    stack = torch.zeros(2, 5, 4, dtype=dtype)
    copy_transposed(stack[1, :, :3], src, scale)  # a strided slice of a slot, as load_slot writes it
    expected = src.t() if scale is None else torch.mul(src.t(), scale)
    assert torch.equal(stack[1, :, :3], expected)  # bit for bit, the scale product included
    assert not stack[0].any() and not stack[1, :, 3].any()


def test_matches_target_peft_style() -> None:
    p = "bert.encoder.layer.0.attention.output.dense"
    assert matches_target(p, ["attention.output.dense"])
    assert matches_target(p, ["dense"])
    assert not matches_target(p, ["output"])
    assert not matches_target(p, ["layer.0.attention"])
    assert matches_target(p, r".*\.attention\.output\.dense")  # a single string is a full-match regex
    assert matches_target(p, None)  # default: inside a repeated block
    assert not matches_target("bert.pooler.dense", None)
    assert not matches_target("classifier", None)


def _tiny_bert() -> BertModel:
    cfg = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return BertModel(cfg).eval()


def test_inject_default_targets_bert_and_state_dict() -> None:
    model = _tiny_bert()
    slots = inject_multi_lora(model, None, num_slots=3, max_rank=4)
    # 6 linears per layer: query, key, value, attention.output.dense, intermediate.dense, output.dense
    assert len(slots.modules) == 12
    assert "encoder.layer.1.output.dense" in slots.modules
    assert "pooler.dense" not in slots.modules
    # stacks are buffers outside the state dict; base weights are shared, not copied
    assert not any("lora_" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="once"):
        inject_multi_lora(model, None, num_slots=3, max_rank=4)


def test_load_validation_and_reload_smaller_rank() -> None:
    model = _tiny_bert()
    slots = inject_multi_lora(model, ["query", "value"], num_slots=3, max_rank=4)
    q = "encoder.layer.0.attention.self.query"
    with pytest.raises(ValueError, match="not a wrapped"):
        slots.load(1, {"encoder.layer.0.attention.self.key": LoraModule(torch.randn(2, 32), torch.randn(32, 2), 1.0)})
    with pytest.raises(ValueError, match="max_rank"):
        slots.load(1, {q: LoraModule(torch.randn(5, 32), torch.randn(32, 5), 1.0)})
    with pytest.raises(ValueError, match="expected"):
        slots.load(1, {q: LoraModule(torch.randn(2, 31), torch.randn(32, 2), 1.0)})
    with pytest.raises(ValueError, match="slot 0"):
        slots.load(0, {q: LoraModule(torch.randn(2, 32), torch.randn(32, 2), 1.0)})
    full = {p: LoraModule(torch.randn(4, 32), torch.randn(32, 4), 1.0) for p in slots.modules}
    slots.load(1, full)
    small = {q: LoraModule(torch.randn(2, 32), torch.randn(32, 2), 1.0)}
    slots.load(1, small)
    fresh = inject_multi_lora(_tiny_bert(), ["query", "value"], num_slots=3, max_rank=4)
    fresh.load(1, small)
    for p, m in slots.modules.items():  # identical to a slot that only ever saw the small adapter
        assert torch.equal(m.lora_A[1], fresh.modules[p].lora_A[1])
        assert torch.equal(m.lora_B[1], fresh.modules[p].lora_B[1])
    slots.clear(1)
    assert not any(m.lora_A[1].any() or m.lora_B[1].any() for m in slots.modules.values())


def _tiny_gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()


def _tiny_llama() -> nn.Module:
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def _peft_options(family: str) -> list[dict]:
    """LoraConfig options a user may pick, one adapter each, all served in one batch: target lists, PEFT's
    `all-linear`, a regex, exclude_modules, layers_to_transform, rank/alpha patterns, rsLoRA, lora_bias, DoRA."""
    attn, mlp, layers = {
        "gpt2": (["c_attn"], ["c_fc", "mlp.c_proj"], "h"),
        "llama": (["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"], "layers"),
        "bert": (["query", "value"], ["intermediate.dense", "output.dense"], "layer"),
    }[family]
    last = mlp[-1].split(".")[-1]
    return [
        dict(target_modules=attn),
        dict(target_modules="all-linear", r=8),
        dict(target_modules=rf".*\.{layers}\.1\..*({'|'.join(m.split('.')[-1] for m in attn)})", r=2),
        dict(target_modules=attn + mlp, exclude_modules=[mlp[0]], rank_pattern={last: 2},
             alpha_pattern={last: 7}, use_rslora=True),
        dict(target_modules=mlp, layers_to_transform=[1], layers_pattern=layers),
        dict(target_modules=attn + mlp, lora_bias=True),
        dict(target_modules="all-linear", use_dora=True),
        dict(target_modules=mlp, use_dora=True, r=2),
    ]


def _through_import(peft_model: nn.Module, folder, base: nn.Module) -> dict[str, LoraModule]:
    """Save with PEFT, then read through the service's import and validation path."""
    from adapters.fingerprint import describe_base
    from adapters.format import import_peft_folder, read_adapter

    info = describe_base(base, "tiny", "generation")
    peft_model.save_pretrained(folder)
    import_peft_folder(folder, "a", "tiny", info, task="generation")
    return read_adapter(folder, info, max_rank=8).lora


def _bare_bert() -> BertModel:
    return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64), add_pooling_layer=False).eval()  # fmt: skip


@pytest.mark.parametrize("family, make", [("gpt2", _tiny_gpt2), ("llama", _tiny_llama), ("bert", _bare_bert)])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_mixed_batch_of_peft_options_matches_peft_per_row(family, make, packed: bool, tmp_path) -> None:
    """Every option of `_peft_options` in one batch, each row equal to PEFT for its adapter alone."""
    torch.manual_seed(1)
    base = make()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    options = _peft_options(family)
    adapters = []
    for i, opts in enumerate(options):
        fresh = make()
        fresh.load_state_dict(state)
        opts = {"r": 4, "lora_alpha": 9, "lora_dropout": 0.0, "fan_in_fan_out": family == "gpt2", **opts}
        peft_model = get_peft_model(fresh, LoraConfig(**opts)).eval()
        randomize_peft(peft_model, 0.2)
        adapters.append((peft_model, _through_import(peft_model, tmp_path / str(i), make())))

    slots = inject_multi_lora(base, None, num_slots=len(adapters) + 1, max_rank=8)
    for i, (_, lora) in enumerate(adapters, start=1):
        slots.load(i, lora)
    assert slots.extra_slots == {6, 7, 8}  # lora_bias and the two DoRA adapters
    if packed:  # as the engines run on CPU fp32: every block linear (LoRA bases included) in oneDNN layout
        assert pack_block_linears(base) > 0

    slot_ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 7, 0, 3])
    ids = torch.randint(1, 100, (len(slot_ids), 9))
    with torch.no_grad(), slots.use(slot_ids):
        got = base(input_ids=ids)
    got = got.logits if hasattr(got, "logits") else got.last_hidden_state
    with torch.no_grad():
        for row, slot in enumerate(slot_ids.tolist()):
            if slot == 0:
                ref_model = make()
                ref_model.load_state_dict(state)
                want = ref_model(input_ids=ids[row : row + 1])
            else:
                want = adapters[slot - 1][0](input_ids=ids[row : row + 1])
            want = want.logits if hasattr(want, "logits") else want.last_hidden_state
            torch.testing.assert_close(got[row : row + 1], want, atol=1e-4, rtol=1e-4, msg=f"row {row} slot {slot}")


def test_use_rejects_bad_slot_ids_and_resets_state() -> None:
    slots = inject_multi_lora(_tiny_bert(), None, num_slots=3, max_rank=4)
    with pytest.raises(ValueError, match="slot ids"):
        with slots.use(torch.tensor([0, 3])):
            pass
    with slots.use(torch.tensor([1, 2])):
        assert slots.state.active
    assert not slots.state.active and slots.state.slot_ids is None


def test_step_reads_only_the_batch_max_rank() -> None:
    """LoRA work follows the largest rank among a forward's slots (slots stay max_rank wide), and the
    result is the full-width one: the columns past a slot's rank are zeros."""
    slots = inject_multi_lora(_tiny_bert(), None, num_slots=4, max_rank=16)
    ranks = {1: 2, 2: 5, 3: 16}
    for slot, r in ranks.items():
        slots.load(slot, {p: LoraModule(torch.randn(r, m.in_features), torch.randn(m.out_features, r), 0.5)
                          for p, m in slots.modules.items()})
    layer = slots.modules["encoder.layer.0.attention.self.query"]
    seen: list[int] = []
    real_bmm = torch.bmm

    def spy_bmm(a, b, *args, **kwargs):
        seen.append(b.shape[-1] if b.shape[-1] <= 16 else a.shape[-1])
        return real_bmm(a, b, *args, **kwargs)

    x = torch.randn(4, 3, 32)
    for ids, rank in (([1, 2, 1, 0], 5), ([1, 1, 1, 1], 2), ([0, 3, 2, 1], 16), ([1, 0, 0, 0], 2)):
        with slots.use(torch.tensor(ids)):
            assert slots.state.rank == rank
            seen.clear()
            torch.bmm = spy_bmm
            try:
                with torch.no_grad():
                    got = layer(x)
            finally:
                torch.bmm = real_bmm
        if len(set(ids)) > 1:
            assert seen and set(seen) == {rank}  # the mixed path's matmuls are rank wide, not max_rank
        want = layer.base(x) + lora_delta_reference(x, torch.tensor(ids), layer.lora_A, layer.lora_B)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    slots.clear(2)
    with slots.use(torch.tensor([1, 2])):
        assert slots.state.rank == 2
