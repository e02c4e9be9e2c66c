"""Static-shape decode (static_cache.py, integration/static_decode.py): the same greedy tokens and
the same cache contents as the dynamic eager path, in-place buffers, no host sync in a step.

On the CPU the runner runs the static steps eagerly (what a CUDA graph would replay); the GPU test
at the end checks graph replay itself on the default model.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from tca_attention.engine import dispatch
from tca_attention.engine.plan import DecodeSelection
from tca_attention.integration import enable
from tca_attention.integration.adapter import cache_kwargs
from tca_attention.integration.static_decode import StaticStep, greedy_static
from tca_attention.methods.full_budget import FullBudget
from tca_attention.methods.state import ModelIdentity
from tca_attention.methods.streaming import StreamingLLM
from tca_attention.methods.tca.config import TCAConfig
from tca_attention.methods.tca.method import TCA
from tca_attention.methods.xattention import XAttention
from tca_attention.static_cache import StaticRaggedCache, StaticRaggedLayer
from test_batch_invariance import B_, W_, greedy, mixed_budgets
from tiny_models import tiny


def method(name: str, model) -> object:
    if name == "tca":
        return TCA(mixed_budgets(TCAConfig(block_size=B_, window=W_), ModelIdentity.of(model)), dense_below=0)
    if name == "tca-dense-below":  # the 90-token row stays dense, then compresses its long tail at step 1
        return TCA(mixed_budgets(TCAConfig(block_size=B_, window=W_), ModelIdentity.of(model)), dense_below=100)
    if name == "tca-dense-at":  # layer 1 keeps everything (dense_at, dense_at=auto's output)
        return TCA(mixed_budgets(TCAConfig(block_size=B_, window=W_), ModelIdentity.of(model)), dense_below=0,
                   dense_at=(1,))
    if name == "streaming":
        return StreamingLLM(sinks=4, window=W_, block_size=B_)
    if name == "xattention":  # block-sparse prefill, the cache keeps everything
        return XAttention(threshold=0.8, stride=4, block_size=16)
    return FullBudget(window=W_, block_size=B_)


def left_padded(lengths: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, L - n:], mask[r, L - n:] = torch.randint(0, 97, (n,), generator=gen), 1
    return ids, mask


def segments(layer, r: int, shift: int) -> list[list[int]]:
    """Sorted visible global positions of each KV head of row r (shifted by its padding)."""
    KV = layer.t_keys.shape[1]
    out = []
    for h in range(KV):
        seg = layer.g_pos[layer.g_offsets[r * KV + h] : layer.g_offsets[r * KV + h + 1]]
        out.append(sorted((seg[seg >= 0] - shift).tolist()))
    return out


def tail(layer, r: int) -> list[int]:
    t = layer.tail_positions()[r]
    return sorted(t[t >= 0].tolist())


STEPS = 26  # > 1.5 blocks: every row compresses at least once, at its own phase


@pytest.mark.parametrize("name,lengths", [
    (name, lengths) for name in ("tca", "streaming", "full-budget") for lengths in ((300,), (300, 251, 45))
] + [("xattention", (300, 251, 45)), ("tca-dense-at", (300, 251, 45))], ids=lambda x: x if isinstance(x, str) else "padded" if len(x) > 1 else "alone")
def test_static_equals_dynamic(name, lengths):
    """Same greedy tokens and, after the same tokens, the same kept positions per (row, head)."""
    model = tiny("llama")
    ids, mask = left_padded(lengths)
    with torch.no_grad(), enable(model, method(name, model), backend="reference") as session:
        _, _, want, dyn = greedy(model, ids, mask, STEPS, session)
        run = greedy_static(model, ids, mask, max_new_tokens=STEPS + 1, session=session)
    assert isinstance(run.cache, StaticRaggedCache) and run.graphs == 0
    assert torch.equal(run.sequences[:, ids.shape[1]: -1], want)
    for a, b in zip(dyn.tca_layers(), run.cache.tca_layers()):
        assert b.seen == a.seen == ids.shape[1] + STEPS
        assert int(b.g_fill.sum()) == a.g_pos.numel()  # the device fill counts: every kept slot
        for r in range(len(lengths)):
            shift = ids.shape[1] - lengths[r]
            assert segments(b, r, shift) == segments(a, r, shift), r
            assert tail(b, r) == tail(a, r), r
            if name in ("tca", "streaming"):  # compression ran: 26 steps would have grown every tail past it
                assert len(tail(b, r)) < W_ + B_


def test_dense_below_row_compresses_its_long_tail_at_the_first_step():
    """A row kept dense at prefill holds its whole prompt in the tail; the first decode step
    compresses all its full blocks at once (several masked passes), as the dynamic path does."""
    model = tiny("llama")
    ids, mask = left_padded((300, 251, 90))
    with torch.no_grad(), enable(model, method("tca-dense-below", model), backend="reference") as session:
        _, _, want, dyn = greedy(model, ids, mask, 12, session)
        run = greedy_static(model, ids, mask, max_new_tokens=13, session=session)
    assert torch.equal(run.sequences[:, ids.shape[1]: -1], want)
    layers = run.cache.tca_layers()
    assert max(l.catchup for l in layers) > 1
    # the long prompt tail is gone after step 1: the ring is back to window + block slots
    assert all(l.t_keys.shape[2] == W_ + B_ for l in layers if l.compresses)
    for a, b in zip(dyn.tca_layers(), layers):
        for r, n in enumerate((300, 251, 90)):
            assert segments(b, r, 300 - n) == segments(a, r, 300 - n) and tail(b, r) == tail(a, r)


@pytest.mark.parametrize("name", ["tca", "tca-dense-below"])
def test_the_global_room_is_exactly_what_compression_can_fill(name):
    """Each segment's room (n_comp * decode_keep[h]) is never overrun, and it is tight: when the
    request's last allowed token would not start another compression, the segments of the row with
    the longest prompt tail end exactly full (the bound (fill + max_new_tokens - window) // block_size
    is reached; the rows differ by their padding, and with dense_below by a dense prompt)."""
    model = tiny("llama")
    ids, mask = left_padded((300, 251, 90))

    def run(max_new: int):
        with torch.no_grad(), enable(model, method(name, model), backend="reference") as session:
            return greedy_static(model, ids, mask, max_new_tokens=max_new, session=session).cache.tca_layers()

    first = [l for l in run(20) if l.compresses]
    assert first
    fill = first[0].prompt_len - first[0].t_pos0  # the longest row tail of the prompt
    # greedy_static feeds max_new - 1 tokens; pick max_new so that the last one would not compress
    max_new = next(n for n in range(20, 20 + B_) if (fill + n - W_) % B_ != 0)
    for layer in run(max_new):
        if not layer.compresses:
            continue
        KV = layer.t_keys.shape[1]
        size = (layer.g_offsets[1:] - layer.g_offsets[:-1]).tolist()
        fill_now = layer.g_fill.tolist()
        assert all(f <= n for f, n in zip(fill_now, size))  # no segment overran its room
        assert len(size) == 3 * KV
        for h, keep in enumerate(layer.keep_host()):
            if keep:  # the row with the longest prompt tail compressed n_comp blocks: its room is full
                assert any(fill_now[r * KV + h] == size[r * KV + h] for r in range(3)), (h, fill_now, size)


def test_full_budget_static_equals_dense_static_and_the_ring_is_not_used():
    model = tiny("llama")
    ids, mask = left_padded((300, 251, 45), seed=2)
    dense = greedy_static(model, ids, mask, max_new_tokens=20)
    with torch.no_grad(), enable(model, method("full-budget", model), backend="reference") as session:
        run = greedy_static(model, ids, mask, max_new_tokens=20, session=session)
    assert torch.equal(run.sequences, dense.sequences)
    for layer in run.cache.tca_layers():
        assert not layer.compresses and layer.n_global == int(layer.g_fill.sum())  # no room: nothing is dropped


@pytest.mark.parametrize("name", [None, "tca"])
def test_steady_context_wraps_the_steady_steps_only(name):
    """greedy_static's steady_context (profile_step's profiler) is entered once, around the steady
    steps: it sees their forwards and no prefill or first-step forward."""
    model = tiny("llama")
    ids, mask = left_padded((150,), seed=4)
    seen: list[int] = []
    active = [False]

    @contextlib.contextmanager
    def steady():
        active[0] = True
        yield
        active[0] = False

    hook = model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["input_ids"].shape[1]) if active[0] else None, with_kwargs=True)
    try:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            session = None if name is None else stack.enter_context(
                enable(model, method(name, model), backend="reference"))
            run = greedy_static(model, ids, mask, max_new_tokens=9, session=session, steady_context=steady())
            plain = greedy_static(model, ids, mask, max_new_tokens=9, session=session)
    finally:
        hook.remove()
    assert not active[0] and run.steady_steps == 7 and seen == [1] * 7  # 8 decode forwards, 1 eager
    assert torch.equal(run.sequences, plain.sequences)


@pytest.mark.parametrize("lengths", [(120,), (120, 90)], ids=["alone", "padded"])
def test_dense_static_runner_equals_model_generate(lengths):
    model = tiny("llama")
    model.generation_config.eos_token_id = None  # the runner never stops early
    ids, mask = left_padded(lengths, seed=3)
    run = greedy_static(model, ids, mask, max_new_tokens=16)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert torch.equal(run.sequences, want)


@pytest.mark.parametrize("prompt", [150, 30], ids=["window-full", "window-fills-during-decode"])
def test_sliding_window_layers(prompt):
    """Gemma3 (sliding layers of 40 tokens next to a full layer): static TCA equals dynamic TCA,
    static dense equals dynamic dense, also when the window fills during decoding (a ring of
    window slots: no phase to branch on)."""
    model = tiny("gemma3")
    ids, mask = left_padded((prompt, prompt - 12), seed=4)
    with torch.no_grad():
        with enable(model, None) as session:
            _, _, want_dense, _ = greedy(model, ids, mask, 18, session)
        dense = greedy_static(model, ids, mask, max_new_tokens=19)
        assert torch.equal(dense.sequences[:, prompt:-1], want_dense)
        with enable(model, method("tca", model), backend="reference") as session:
            _, _, want, _ = greedy(model, ids, mask, 18, session)
            run = greedy_static(model, ids, mask, max_new_tokens=19, session=session)
    assert torch.equal(run.sequences[:, prompt:-1], want)


def test_session_generate_cuda_graph_runs_the_static_path_on_the_cpu():
    model = tiny("qwen2")
    ids, mask = left_padded((200, 170), seed=5)
    m = method("tca", model)
    with torch.no_grad(), enable(model, m, backend="reference") as session:
        out = session.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, cuda_graph=True)
        assert isinstance(session.cache, StaticRaggedCache) and session.last_run.sequences is out
        _, _, want, _ = greedy(model, ids, mask, 9, session)
        with pytest.raises(TypeError, match="sampling"):
            session.generate(input_ids=ids, max_new_tokens=4, do_sample=True, cuda_graph=True)
        with pytest.raises(TypeError, match="temperature"):
            session.generate(input_ids=ids, max_new_tokens=4, temperature=0.5, cuda_graph=True)
    assert out.shape == (2, 210) and torch.equal(out[:, 200:-1], want)


@pytest.mark.parametrize("arch,name", [("llama", "tca"), ("llama", None), ("gemma3", "tca")])
def test_compiled_layers_decode_the_same_tokens_and_put_everything_back(arch, name, caplog):
    """compile_layers=True: the decode steps run through torch.compile'd decoder layers (more
    layers than dynamo's default recompile limit, so none may fall back to eager), with the same
    greedy tokens as the plain static steps; afterwards the model's layers, the registered
    attention function and the cache's update are the originals again."""
    import torch._dynamo
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from tca_attention.integration.adapter import attention_implementation

    layers = 10 if arch == "llama" else 3
    extra = {} if arch == "llama" else {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
    model = tiny(arch, num_hidden_layers=layers, **extra)
    ids, mask = left_padded((300, 251, 45))
    before = list(model.model.layers)
    with torch.no_grad(), (enable(model, method(name, model), backend="reference") if name
                           else contextlib.nullcontext()) as session:
        impl = attention_implementation(model)
        fn = ALL_ATTENTION_FUNCTIONS[impl]
        want = greedy_static(model, ids, mask, max_new_tokens=8, session=session)
        torch._dynamo.utils.counters.clear()
        with caplog.at_level("WARNING", logger="torch._dynamo"):
            run = greedy_static(model, ids, mask, max_new_tokens=8, session=session, compile_layers=True)
        assert run.compiled_layers and torch.equal(run.sequences, want.sequences)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # compiled code ran
        assert "recompile_limit" not in caplog.text and "cache_size_limit" not in caplog.text
        assert all(a is b for a, b in zip(before, model.model.layers)) and len(before) == layers
        assert ALL_ATTENTION_FUNCTIONS[impl] is fn and "update" not in vars(run.cache)
        if session is not None:
            with pytest.raises(ValueError, match="needs cuda_graph=True"):
                session.generate(input_ids=ids, max_new_tokens=4, compile_layers=True)


@pytest.mark.parametrize("prefill", [False, True])
def test_compile_tuning_hands_inductor_its_tuning_options(prefill, monkeypatch):
    """compile_tuning=True: every compilation of the decoder layers (decode, and prefill with
    compile_prefill) gets inductor's GEMM autotuning and coordinate-descent tuning, and none without
    it; it needs compile_layers, and a session's generate needs cuda_graph for it. torch.compile is
    recorded, not run (the options are what is under test; compiling is the tests above)."""
    from tca_attention.integration import compiled_layers

    calls = []

    def record(module, **kwargs):
        calls.append(kwargs)
        return module

    monkeypatch.setattr(compiled_layers.torch, "compile", record)
    model = tiny("llama", num_hidden_layers=2)
    ids, mask = left_padded((60, 41))
    with torch.no_grad(), enable(model, method("tca", model), backend="reference") as session:
        want = greedy_static(model, ids, mask, max_new_tokens=4, session=session)
        for tuning in (False, True):
            calls.clear()
            run = greedy_static(model, ids, mask, max_new_tokens=4, session=session, compile_layers=True,
                                compile_prefill=prefill, compile_tuning=tuning)
            assert torch.equal(run.sequences, want.sequences)
            assert len(calls) == 2 * (2 if prefill else 1)
            assert all(c["options"] == (compiled_layers.TUNED_OPTIONS if tuning else None) for c in calls)
            assert sorted(c["dynamic"] for c in calls) == ([False, False, True, True] if prefill else [False, False])
        with pytest.raises(ValueError, match="compile_tuning=True needs compile_layers"):
            greedy_static(model, ids, mask, max_new_tokens=2, session=session, compile_tuning=True)
        with pytest.raises(ValueError, match="compile_layers/compile_tuning=True needs cuda_graph=True"):
            session.generate(input_ids=ids, max_new_tokens=2, compile_layers=True, compile_tuning=True)
    assert compiled_layers.TUNED_OPTIONS == {"max_autotune_gemm": True, "coordinate_descent_tuning": True}


@pytest.mark.parametrize("arch,name", [("llama", "tca"), ("llama", None), ("gemma3", "tca")])
def test_compiled_prefill_decodes_the_same_tokens_and_compiles_once_for_every_length(arch, name, caplog):
    """compile_prefill=True: the prompt's forward runs through a dynamic-shape compilation of each
    decoder layer, the decode steps through the static one; the greedy tokens equal the plain
    static run's, and a second prompt of another length (same cache capacity) compiles nothing new."""
    import torch._dynamo

    layers = 10 if arch == "llama" else 3
    extra = {} if arch == "llama" else {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
    model = tiny(arch, num_hidden_layers=layers, **extra)
    before = list(model.model.layers)
    with torch.no_grad(), (enable(model, method(name, model), backend="reference") if name
                           else contextlib.nullcontext()) as session:
        with pytest.raises(ValueError, match="needs compile_layers"):
            greedy_static(model, *left_padded((60,)), max_new_tokens=2, session=session, compile_prefill=True)
        for lengths, new, fresh in (((300, 251, 45), 8, True), ((290, 200, 77), 18, False)):
            ids, mask = left_padded(lengths, seed=len(lengths) + new)
            want = greedy_static(model, ids, mask, max_new_tokens=new, session=session)
            torch._dynamo.utils.counters.clear()
            with caplog.at_level("WARNING", logger="torch._dynamo"):
                run = greedy_static(model, ids, mask, max_new_tokens=new, session=session, compile_layers=True,
                                    compile_prefill=True)
            assert run.compiled_prefill and torch.equal(run.sequences, want.sequences)
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            assert graphs >= 2 if fresh else graphs == 0, (lengths, graphs)
            assert "recompile_limit" not in caplog.text and "cache_size_limit" not in caplog.text
        assert all(a is b for a, b in zip(before, model.model.layers))
        if session is not None:
            with pytest.raises(ValueError, match="needs cuda_graph=True"):
                session.generate(input_ids=ids, max_new_tokens=4, compile_prefill=True)


def test_model_generate_runs_on_the_static_cache_eagerly():
    """transformers' own generate() with session.new_cache(max_new_tokens=N): the same tokens as
    the dynamic cache and as the graph runner (every step runs the masked compression pass)."""
    model = tiny("llama")
    model.generation_config.eos_token_id = None
    ids, mask = left_padded((200, 150), seed=9)
    with torch.no_grad(), enable(model, method("tca", model), backend="reference") as session:
        want = session.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
        cache = session.new_cache(max_new_tokens=20)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, **cache_kwargs(cache))
        runner = session.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, cuda_graph=True)
    assert torch.equal(got, want) and torch.equal(runner, want)
    assert all(l.compress_pass and l.seen == 219 for l in cache.tca_layers())


# ---------------------------------------------------------------------------------------------
# a decode step: buffers in place, no host sync
_SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")


@contextlib.contextmanager
def no_host_sync():
    """Tensor methods that read a value on the host raise while active (CPU stand-in for CUDA's
    sync debug mode)."""
    saved = {n: getattr(torch.Tensor, n) for n in _SYNCS}

    def refuse(name):
        def f(self, *args, **kwargs):
            raise AssertionError(f"host sync in a guarded step: Tensor.{name}")
        return f

    for n in _SYNCS:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def _buffers(cache) -> dict[str, int]:
    out = {}
    for i, layer in enumerate(cache.layers):
        for name in ("t_keys", "t_values", "t_pos", "t_first", "g_keys", "g_values", "g_pos", "g_offsets", "g_fill",
                     "next_pos", "q_pos", "keys", "values", "cumulative_length"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                out[f"{i}.{name}"] = t.data_ptr()
    return out


def _prefill_and_step(model, session, ids, mask, n):
    cache = session.new_cache(max_new_tokens=n) if session is not None and not session.method.is_dense else None
    if cache is None:
        from tca_attention.integration.adapter import static_dense_cache

        cache = static_dense_cache(model, ids.shape[1] + n)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **cache_kwargs(cache))
    toks = torch.zeros(ids.shape[0], n, dtype=torch.long, device=ids.device)
    toks[:, 0] = out.logits[:, -1].argmax(-1)
    step = StaticStep(model, cache, toks[:, 0], (mask.cumsum(-1) == 0).sum(-1), pos[:, -1:] + 1, ids.shape[1], toks)
    return cache, step


def test_a_tca_step_reallocates_nothing_and_never_syncs():
    """Triton kernels (on CUDA where present, else the interpreter on the CPU), the same code a graph
    captures: after the eager first step, steps (with compressions among them) keep every cache
    buffer in place and read nothing on the host."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny("llama", num_hidden_layers=1).to(dev)
    ids, mask = (t.to(dev) for t in left_padded((120, 90), seed=6))
    with torch.no_grad(), enable(model, method("tca", model), backend="triton") as session:
        # room for 24 new tokens, 11 steps run: part of the global room stays unused (slots at -1)
        cache, step = _prefill_and_step(model, session, ids, mask, 24)
        step()
        before = _buffers(cache)
        layer = cache.tca_layers()[0]
        fill0 = int(layer.g_fill.sum())
        with no_host_sync():
            for _ in range(10):  # rows compress at steps 6 and 8
                step()
        assert _buffers(cache) == before
        assert int(layer.g_fill.sum()) > fill0  # compressions happened inside the guarded steps
        # the kernel reads the static layout (room slots, wrapped ring) as the reference does
        q = torch.randn(2, 6, 1, 16, device=dev)
        q_pos = (layer.next_pos - 1).view(1, 1).expand(2, 1)
        got, got_lse = dispatch.ragged_decode(q, layer.view(q_pos), 0.25, backend="triton")
        want, want_lse = dispatch.ragged_decode(q, layer.view(q_pos), 0.25, backend="reference")
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_lse, want_lse, rtol=1e-4, atol=1e-5)
        assert int((layer.g_pos < 0).sum()) > 0 and layer.seen - layer.t_pos0 > layer.t_keys.shape[2]  # room, wrapped
        # the guard does catch reads: the dynamic cache's decode compression syncs
        dyn = session.new_cache()
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(dyn))
        with no_host_sync(), pytest.raises(AssertionError, match="host sync"):
            for _ in range(60):
                model(input_ids=ids[:, :1], attention_mask=torch.ones(2, 1, device=dev), **cache_kwargs(dyn))


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_a_sessions_later_prefills_commit_without_host_sync(static):
    """Each layer's cache commit takes the method's decode keep counts made once per session: built
    on the host and copied to the GPU at every prefill, they synchronised the stream once per layer
    (Qwen2.5-0.5B at 8K, batch 1, H100: the prefill 25-50% slower than plain attention). A prompt
    shorter than TCA's dense_below (plain attention, everything committed), unpadded: the second
    prefill asks the method nothing and reads nothing on the host (on CUDA: under the sync debug
    mode too), and every layer keeps the method's counts on the model's device."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny("llama", num_hidden_layers=2).to(dev)
    ids = torch.randint(0, 97, (1, 90), generator=torch.Generator().manual_seed(3)).to(dev)
    m = method("tca-dense-below", model)
    calls = []
    keep = m.decode_keep
    object.__setattr__(m, "decode_keep", lambda i, kv: calls.append(i) or keep(i, kv))
    with torch.no_grad(), enable(model, m, backend="triton") as session:
        def prefill():
            cache = session.new_cache(max_new_tokens=4) if static else session.new_cache()
            model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
            return cache

        prefill()
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            with no_host_sync():
                cache = prefill()
        finally:
            if dev == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    assert sorted(calls) == [0, 1]
    assert session.prefill_report()["kept_fraction"] == 1.0
    for i, layer in enumerate(cache.tca_layers()):
        assert layer.decode_keep.device == ids.device and torch.equal(layer.decode_keep.cpu(), keep(i, 2))
        assert bool((layer.decode_keep < B_).any())  # the counts that compress the decode tail


def peer(name: str):
    """A decode-side selection method with a budget well below the 120-token prompt."""
    from tca_attention.methods.quest import Quest
    from tca_attention.methods.recycled import RecycledAttention
    from tca_attention.methods.tidaldecode import TidalDecode
    from tca_attention.methods.tokenselect import TokenSelect

    return {"quest": lambda: Quest(budget=32, page_size=8, skip_layers=0),
            "tokenselect": lambda: TokenSelect(budget=24, sinks=4, local=16, threshold=0.1),
            "recycled": lambda: RecycledAttention(budget=24, stride=3, similarity=0.1),
            "tidaldecode": lambda: TidalDecode(budget=24, select_layer=0, reselect_layer=-1)}[name]()


def _state_tensors(x, name: str, out: dict[str, int], depth: int = 3) -> dict[str, int]:
    """data_ptr of every tensor in x (dicts and plain objects, a few levels deep): a method's state."""
    if isinstance(x, torch.Tensor):
        out[name] = x.data_ptr()
    elif depth and isinstance(x, dict):
        for k, v in x.items():
            _state_tensors(v, f"{name}.{k}", out, depth - 1)
    elif depth and hasattr(x, "__dict__") and not callable(x):
        for k, v in vars(x).items():
            _state_tensors(v, f"{name}.{k}", out, depth - 1)
    return out


def _method_state(m, cache) -> dict[str, int]:
    """The addresses a replayed graph would read and write: the method's own tensors (counters,
    cross-layer state) and each layer's per-request state."""
    out = _state_tensors(m, "method", {})
    for i, layer in enumerate(cache.tca_layers()):
        _state_tensors(layer.method_state, f"layer{i}", out)
    return out


@pytest.mark.parametrize("name", ["quest", "tokenselect", "recycled", "tidaldecode"])
def test_a_selecting_step_reallocates_nothing_and_never_syncs(name):
    """A graph-safe decode-side method's static steps (Triton kernels, as a graph captures them):
    after the eager first step, select_decode runs on the StaticRaggedLayer of every layer with
    no host read (Tensor.item/tolist/... raise), the cache buffers and the method's state (its
    counters, per-layer and cross-layer tensors: what a replayed graph reads and writes) stay in
    place, and it selects.
    On CUDA also: a step under the sync debug mode, replays that allocate nothing, and graph replay
    giving the eager static steps' tokens and read fraction (its counters advance in the replays)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny("llama", num_hidden_layers=2).to(dev)
    ids, mask = (t.to(dev) for t in left_padded((120, 90), seed=6))
    m = peer(name)
    calls = []
    select = m.select_decode

    def recorded(layer_idx, q, layer):
        assert isinstance(layer, StaticRaggedLayer)
        sel = select(layer_idx, q, layer)
        calls.append(sel is not None)
        return sel

    object.__setattr__(m, "select_decode", recorded)
    with torch.no_grad(), enable(model, m, backend="triton") as session:
        cache, step = _prefill_and_step(model, session, ids, mask, 40 if dev == "cuda" else 12)
        step()
        before, state = _buffers(cache), _method_state(m, cache)
        calls.clear()
        with no_host_sync():
            for _ in range(8):
                step()
        assert _buffers(cache) == before
        assert _method_state(m, cache) == state and len(state) > 1
        if dev == "cuda":
            _no_sync_and_no_allocation(step)
    assert len(calls) >= 16 and any(calls)
    assert session.prefill_report()["decode_kept_fraction"] < 1
    if dev == "cuda":
        runs = []
        for graph in (False, True):
            with torch.no_grad(), enable(model, peer(name), backend="triton") as s:
                runs.append((greedy_static(model, ids, mask, max_new_tokens=16, session=s, cuda_graph=graph),
                             s.prefill_report()["decode_kept_fraction"]))
        (eager, f_eager), (replayed, f_replayed) = runs
        assert replayed.graphs == 1 and torch.equal(replayed.sequences, eager.sequences)
        assert f_replayed == pytest.approx(f_eager, rel=1e-9)


def test_a_dense_static_step_reallocates_nothing_and_never_syncs():
    model = tiny("gemma3")
    ids, mask = left_padded((60, 50), seed=7)
    with torch.no_grad():
        cache, step = _prefill_and_step(model, None, ids, mask, 12)
        step()
        before = _buffers(cache)
        with no_host_sync():
            for _ in range(8):
                step()
        assert _buffers(cache) == before


# ---------------------------------------------------------------------------------------------
# methods with per-step page selections
class _SelectsNonEmptyPages(FullBudget):
    """Full budget reading only the tail pages that hold a visible slot: page ids computed on the
    device from the static layer's positions (sorted, -1 padded), so the result equals full budget."""

    def select_decode(self, layer_idx, q, layer):
        ps = 8
        pos = layer.tail_positions()  # (B, T)
        B, T = pos.shape
        n = -(-T // ps)
        used = torch.nn.functional.pad(pos >= 0, (0, n * ps - T)).view(B, n, ps).any(-1)  # (B, n)
        ids = torch.arange(n, dtype=torch.int32, device=pos.device).expand(B, n)
        pages = torch.where(used, ids, n).sort(-1).values
        pages = torch.where(pages == n, -1, pages).to(torch.int32)
        return DecodeSelection(ps, pages[:, None, :].expand(B, layer.t_keys.shape[1], n).contiguous())

    def supports_static_decode(self) -> bool:
        return True


class _UndeclaredSelection(FullBudget):
    def select_decode(self, layer_idx, q, layer):
        return None


def test_a_graph_safe_page_selection_runs_static_steps():
    model = tiny("llama")
    ids, mask = left_padded((300, 251, 45), seed=8)
    with torch.no_grad():
        with enable(model, _SelectsNonEmptyPages(window=W_, block_size=B_), backend="reference") as session:
            run = greedy_static(model, ids, mask, max_new_tokens=12, session=session)
        with enable(model, method("full-budget", model), backend="reference") as session:
            want = greedy_static(model, ids, mask, max_new_tokens=12, session=session)
    assert torch.equal(run.sequences, want.sequences)


def test_refusals():
    model = tiny("llama")
    ids, _ = left_padded((100,))
    with enable(model, _UndeclaredSelection(window=W_, block_size=B_), backend="reference") as session:
        with pytest.raises(ValueError, match="not declared graph-safe"):
            session.new_cache(max_new_tokens=4)
        with pytest.raises(ValueError, match="not declared graph-safe"):
            session.generate(input_ids=ids, max_new_tokens=4, cuda_graph=True)
    with enable(model, None) as session, pytest.raises(ValueError, match="StaticCache"):
        session.new_cache(max_new_tokens=4)
    with torch.no_grad(), enable(model, method("tca", model), backend="reference") as session:
        cache = session.new_cache(max_new_tokens=2)
        model(input_ids=ids, **cache_kwargs(cache))
        with pytest.raises(ValueError, match="one token per step"):
            model(input_ids=ids[:, :2], **cache_kwargs(cache))
        model(input_ids=ids[:, :1], **cache_kwargs(cache))
        model(input_ids=ids[:, :1], **cache_kwargs(cache))
        with pytest.raises(RuntimeError, match="full"):
            model(input_ids=ids[:, :1], **cache_kwargs(cache))
    with pytest.raises(ValueError, match="max_new_tokens"):
        StaticRaggedLayer(B_, W_, max_new_tokens=0)
    gemma = tiny("gemma3")  # a window ring's decode mask comes from the runner, never from transformers
    with torch.no_grad(), enable(gemma, method("tca", gemma), backend="reference") as session:
        cache = session.new_cache(max_new_tokens=4)
        gemma(input_ids=ids, **cache_kwargs(cache))
        with pytest.raises(RuntimeError, match="static runner"):
            gemma(input_ids=ids[:, :1], **cache_kwargs(cache))


# ---------------------------------------------------------------------------------------------
def _cuda_step(model, session, input_ids, attention_mask, n):
    """A prefilled static cache and its StaticStep, two warm-up steps run on a side stream."""
    cache, step = _prefill_and_step(model, session, input_ids, attention_mask, n)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    return cache, step


def _no_sync_and_no_allocation(step) -> None:
    """One step under CUDA's sync debug mode ("error": a synchronising call raises), then a captured
    step replayed 20 times without the caching allocator allocating anything."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    for _ in range(20):
        g.replay()
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats()
    for key in ("allocation.all.allocated", "segment.all.allocated", "allocated_bytes.all.current"):
        assert after[key] == before[key], key


@pytest.mark.gpu
def test_graph_replay_equals_eager_on_the_default_model():
    """smollm2 (bf16, CUDA) with calibrated TCA budgets, a left-padded batch of 2: graph replay
    gives the eager static steps' tokens, decode compression runs inside the replays, a step
    issues no host sync and replays allocate nothing; the same for dense over StaticCache."""
    from tca_attention import calibrate
    from tca_attention.data.passkey import passkey_prompt
    from tca_attention.methods.tca.config import SMALL_CONTEXT
    from tca_attention.models import load_model

    assert torch.cuda.is_available()
    model, tok = load_model("smollm2", device="cuda")
    budgets = calibrate(model, tok, SMALL_CONTEXT, length=2048, progress=False)
    texts = [passkey_prompt(tok, n, seed=n).text for n in (3000, 2300)]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left").to("cuda")
    ids, mask = enc.input_ids, enc.attention_mask
    assert int(mask[1].sum()) < ids.shape[1]  # really padded
    n = SMALL_CONTEXT.block_size + 40  # every row's tail reaches window + block once at least
    with torch.no_grad(), enable(model, TCA(budgets, dense_below=0)) as session:
        eager = greedy_static(model, ids, mask, max_new_tokens=n, session=session, cuda_graph=False)
        graph = greedy_static(model, ids, mask, max_new_tokens=n, session=session)
        assert graph.graphs == 2 and graph.steady_steps == n - 3  # with and without the compression pass
        assert torch.equal(graph.sequences, eager.sequences)
        assert any(l.compresses for l in graph.cache.tca_layers())
        for a, b in zip(eager.cache.tca_layers(), graph.cache.tca_layers()):
            assert torch.equal(a.g_fill, b.g_fill) and torch.equal(a.t_first, b.t_first)
        assert graph.cache.kv_bytes() < graph.cache.dense_kv_bytes()
        _, step = _cuda_step(model, session, ids, mask, n)
        _no_sync_and_no_allocation(step)
    dense_eager = greedy_static(model, ids, mask, max_new_tokens=24, cuda_graph=False)
    dense_graph = greedy_static(model, ids, mask, max_new_tokens=24)
    assert dense_graph.graphs == 1 and torch.equal(dense_graph.sequences, dense_eager.sequences)
    with torch.no_grad():
        _, step = _cuda_step(model, None, ids, mask, 24)
        _no_sync_and_no_allocation(step)


@pytest.mark.gpu
@pytest.mark.parametrize("compile_prefill", [False, True])
def test_graph_replay_with_compiled_layers_equals_eager_on_the_default_model(compile_prefill):
    """compile_layers=True on the GPU: the compiled layers are captured in the graphs and the
    replays give the eager static steps' tokens, with decode compression inside the replays;
    compile_prefill: the prompt's forward compiled too, same tokens. float32: inductor's fused
    kernels round differently from eager ones, and in bf16 that flipped a greedy token after
    about 140 of the 152 TCA steps (H100, 2026-12-06), so equality is asked where rounding
    cannot decide a token."""
    from tca_attention import calibrate
    from tca_attention.data.passkey import passkey_prompt
    from tca_attention.methods.tca.config import SMALL_CONTEXT
    from tca_attention.models import load_model

    assert torch.cuda.is_available()
    model, tok = load_model("smollm2", device="cuda", dtype=torch.float32)
    budgets = calibrate(model, tok, SMALL_CONTEXT, length=2048, progress=False)
    ids = tok([passkey_prompt(tok, 3000, seed=3).text], return_tensors="pt").input_ids.to("cuda")
    n = SMALL_CONTEXT.block_size + 24
    with torch.no_grad(), enable(model, TCA(budgets, dense_below=0)) as session:
        eager = greedy_static(model, ids, max_new_tokens=n, session=session, cuda_graph=False)
        graph = greedy_static(model, ids, max_new_tokens=n, session=session, compile_layers=True,
                              compile_prefill=compile_prefill)
        assert graph.graphs == 2 and graph.compiled_layers and torch.equal(graph.sequences, eager.sequences)
        assert graph.compiled_prefill == compile_prefill
        assert any(l.compresses for l in graph.cache.tca_layers())
    dense_eager = greedy_static(model, ids, max_new_tokens=24, cuda_graph=False)
    dense_graph = greedy_static(model, ids, max_new_tokens=24, compile_layers=True, compile_prefill=compile_prefill)
    assert dense_graph.graphs == 1 and torch.equal(dense_graph.sequences, dense_eager.sequences)
