"""llama.cpp (through llama-cpp-python) with image embeddings injected as the prompt's prefix.

Pipeline for one request::

    head tokens ([BOS] <|user|>)  ->  fused image rows (float32, n_embd wide)  ->  tail tokens (prompt,
    <|end|> <|assistant|>)  ->  greedy decoding until one of the stop tokens

Which tokens go where comes from the caller (the bundle's prompt layout), never from a constant here.

Must-nots (each aborts the process inside llama.cpp rather than raising): a decode batch larger than
``n_batch``; embedding rows of the wrong width; token ids outside the vocabulary; positions past ``n_ctx``.
Two functions call ``llama_decode``: ``LlamaCppLLM._decode`` (prompts, image rows, scored answers; chunked to
``n_batch``, every guard) and ``_step`` (one token for each of up to ``n_seq`` sequences: the vocabulary and
position guards; ``n_seq <= n_batch`` is checked at construction). Logits are requested only where used.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time

import numpy as np

from samf.errors import EngineUnavailable, SamfError

from .greedy import Greedy, greedy_decode
from .native import CoreShare, quiet_native_stderr, usable_cores


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise EngineUnavailable(f"llama-cpp-python is not installed ({e}); pip install llama-cpp-python") from None
    _load_backends(llama_cpp.llama_cpp._lib)
    return llama_cpp


#: Pins llama.cpp's CPU backend, in a portable build (CMakeLists.txt), to one variant (``haswell`` for
#: libggml-cpu-haswell.so): to compare variants, or to keep off one. Unset: ggml scores every variant against
#: this CPU and loads the best.
CPU_VARIANT_ENV = "SAMF_LLAMA_CPU_VARIANT"
_CPU_PREFIX, _SUFFIX = "libggml-cpu-", ".so"
_backends_loaded = False
_backends_lock = threading.Lock()  # the service opens pipelines from more than one thread


def _variant_of(filename: str) -> str | None:
    """``haswell`` for ``libggml-cpu-haswell.so``; None for any other file."""
    if filename.startswith(_CPU_PREFIX) and filename.endswith(_SUFFIX):
        return filename[len(_CPU_PREFIX):-len(_SUFFIX)]
    return None


def cpu_variants(folder: str) -> list:
    """The CPU variants a portable llama.cpp build has in ``folder`` (``libggml-cpu-<name>.so``), by name."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(v for v in map(_variant_of, names) if v)


def loaded_cpu_variant() -> str | None:
    """The CPU variant this process runs (read from its memory map); None before one is loaded or in a build
    whose CPU backend is linked in (``libggml-cpu.so``, one instruction set)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                variant = _variant_of(os.path.basename(line.split()[-1])) if "/" in line else None
                if variant:
                    return variant
    except OSError:  # pragma: no cover - not Linux
        pass
    return None


def _load_backends(lib) -> None:
    """Register the backends of a build whose backends are modules beside libllama (``GGML_BACKEND_DL``: the
    portable build's CPU variants, a GPU backend), once per process, before the first model load.
    llama-cpp-python never calls ggml's ``ggml_backend_load_all``, so without this such a build has no CPU
    backend at all.

    ``lib`` is the loaded libllama; ggml's functions are looked up through it (dlsym searches its
    dependencies), so they are those of the very libggml it uses, not of a second copy."""
    with _backends_lock:
        if not _backends_loaded:
            _register_backends(lib)


def _register_backends(lib) -> None:
    global _backends_loaded
    folder = os.path.dirname(os.path.realpath(lib._name))
    lib.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    lib.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    if not lib.ggml_backend_reg_by_name(b"CPU"):  # else the CPU backend is linked into libggml (pip's own build)
        pinned, variants = os.environ.get(CPU_VARIANT_ENV, "").strip(), cpu_variants(folder)
        if pinned:
            if pinned not in variants:
                raise EngineUnavailable(f"{CPU_VARIANT_ENV}={pinned}: no such CPU variant in {folder} "
                                        f"(it has {', '.join(variants)})")
            lib.ggml_backend_load.restype = ctypes.c_void_p
            lib.ggml_backend_load.argtypes = [ctypes.c_char_p]
            with quiet_native_stderr():
                lib.ggml_backend_load(os.path.join(folder, f"{_CPU_PREFIX}{pinned}{_SUFFIX}").encode())
        else:
            lib.ggml_backend_load_all_from_path.restype = None
            lib.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
            with quiet_native_stderr():
                lib.ggml_backend_load_all_from_path(folder.encode())
        if not lib.ggml_backend_reg_by_name(b"CPU"):
            which = f"the CPU variant {pinned}" if pinned else "none of the CPU variants"
            raise EngineUnavailable(f"llama.cpp in {folder}: {which} runs on this CPU")
    _backends_loaded = True


#: Quant types (as bundles name them) whose weights llama.cpp's CPU backend repacks into its own layout on
#: load; Q8_0, F16 and BF16 are used as mapped (measured: their resident memory is the file's).
REPACKED_ON_CPU = ("Q4_0", "Q4_K", "IQ4_NL")


@contextlib.contextmanager
def _default_params(ll, model: dict, context: dict):
    """llama-cpp-python 0.3.36 has no argument for llama.cpp's ``use_extra_bufts`` (weight repacking) nor for
    ``n_seq_max`` (sequences decoded together); its ``Llama`` starts from ``llama_model_default_params()`` and
    ``llama_context_default_params()``, so that is where these go, for one load."""
    saved = ll.llama_model_default_params, ll.llama_context_default_params

    def patched(default, fields):
        def params():
            p = default()
            for k, v in fields.items():
                setattr(p, k, v)
            return p
        return params

    ll.llama_model_default_params = patched(saved[0], model)
    ll.llama_context_default_params = patched(saved[1], context)
    try:
        yield
    finally:
        ll.llama_model_default_params, ll.llama_context_default_params = saved


class LlamaCppLLM:
    """A loaded GGUF model ready for embedding-prefixed greedy generation."""

    def __init__(self, gguf_path: str, n_ctx: int = 1024, n_batch: int = 512, n_threads: int | None = None,
                 n_gpu_layers: int = 0, repack: bool | None = None, verbose: bool = False, n_seq: int = 1):
        """``n_ctx``: positions per sequence. ``n_seq``: sequences :meth:`generate_many` decodes together, each
        with its own ``n_ctx`` KV cells (the context holds ``n_ctx * n_seq``).

        ``n_threads``: for decoding and prefill alike (both set: llama-cpp-python's own default for decoding is
        half the cores, one of two idle, measured 7.3 against 13.4 tok/s on Phi-3-mini Q4_K_M). Default: every
        core this process may use that no other program keeps busy, followed as it changes
        (:class:`~samf.engines.native.CoreShare`): llama.cpp's threads spin at every operation's barrier, so
        one on a core another process holds stalls the rest.

        ``repack``, for weights llama.cpp's CPU backend repacks (:data:`REPACKED_ON_CPU`): True copies them
        into its interleaved layout at load (its "extra buffer types") and reads the file rather than mapping
        it, or the weights are resident twice (Phi-3-mini Q4_K_M: 4.3 GB mapped against 2.8 GB read); False
        maps the file and uses the weights as they are. Measured on Phi-3-mini Q4_K_M, 2 cores: repacked,
        decode 12.5-13.2 tok/s and 4-5 s to load; mapped, 10.0-10.8 tok/s and 0.35 s. None: llama.cpp's
        defaults (mapped, extra buffer types on), for every other type."""
        llama_cpp = _llama_cpp()
        if not os.path.exists(gguf_path):
            raise SamfError(f"LLM file not found: {gguf_path}")
        self._ll = llama_cpp.llama_cpp
        threads = n_threads or usable_cores()
        self._share = CoreShare(threads) if n_threads is None else None
        self.n_threads = threads
        ctxmgr = contextlib.nullcontext() if verbose else quiet_native_stderr()
        most = min(n_batch, self._ll.llama_max_parallel_sequences())
        if not 1 <= n_seq <= most:
            raise SamfError(f"{n_seq} sequences at once: this LLM takes 1 to {most}")
        self.n_seq = n_seq
        with ctxmgr, _default_params(self._ll, dict(use_extra_bufts=repack is not False),
                                     dict(n_seq_max=n_seq, kv_unified=False)):
            try:
                self.llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=n_ctx * n_seq, n_batch=n_batch,
                                           n_ubatch=n_batch, n_threads=threads, n_threads_batch=threads,
                                           n_gpu_layers=n_gpu_layers, use_mmap=repack is not True, logits_all=False,
                                           verbose=verbose)
            except Exception as e:
                raise SamfError(f"llama.cpp cannot load {gguf_path}: {e}") from None
        self.n_ctx = int(self._ll.llama_n_ctx_seq(self.llm.ctx))  # per sequence
        self.n_batch = n_batch
        self.n_embd = int(self._ll.llama_model_n_embd_inp(self.llm.model))
        self.n_vocab = self.llm.n_vocab()
        self.adapt_threads()
        #: Time spent in :meth:`generate_many`'s decode steps and the tokens they produced (decode throughput).
        self.step_stats = dict(seconds=0.0, tokens=0)

    def adapt_threads(self) -> int:
        """Set llama.cpp's decode and batch threads to the cores free now (when ``n_threads`` was not given)."""
        if self._share is not None:
            n = self._share.threads()
            if n != self.n_threads:
                self._ll.llama_set_n_threads(self.llm.ctx, n, n)
                self.n_threads = n
        return self.n_threads

    def tokenize(self, text: str) -> list:
        """Plain text -> ids, without BOS or special tokens (the layout's scaffolding comes as ids)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def detokenize(self, ids: list) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace").strip()

    # ------------------------------------------------------------------------------------ decode
    def _decode(self, pos0: int, tokens: list | None = None, rows: np.ndarray | None = None,
                want_logits: bool = True, all_logits: bool = False, seq: int = 0) -> list:
        """Decode token ids or embedding rows of sequence ``seq`` from position ``pos0``, in chunks of at most
        ``n_batch``; logits for the very last one (or, with ``all_logits``, every one: returned as a list).

        Every call into llama.cpp goes through here, so here are the guards against what would abort it
        instead of raising: rows of the wrong width, token ids outside the vocabulary, positions past
        ``n_ctx``, and batches larger than ``n_batch`` (split into chunks)."""
        out = []
        ll = self._ll
        if rows is not None:
            rows = np.ascontiguousarray(rows, dtype=np.float32)
            if rows.ndim != 2 or rows.shape[1] != self.n_embd:
                raise SamfError(f"image embeddings have shape {rows.shape}; the LLM expects [N, {self.n_embd}]")
        else:
            self._check_ids(tokens)
        total = len(rows) if rows is not None else len(tokens)
        if pos0 + total > self.n_ctx:
            raise SamfError(f"request needs {pos0 + total} positions but the LLM context holds {self.n_ctx}")
        for start in range(0, total, self.n_batch):
            n = min(self.n_batch, total - start)
            batch = ll.llama_batch_init(n, self.n_embd if rows is not None else 0, 1)
            try:
                if rows is not None:
                    chunk = rows[start: start + n]
                    ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
                for i in range(n):
                    if rows is None:
                        batch.token[i] = tokens[start + i]
                    batch.pos[i] = pos0 + start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = 1 if all_logits or (want_logits and start + i == total - 1) else 0
                batch.n_tokens = n
                if ll.llama_decode(self.llm.ctx, batch) != 0:
                    raise SamfError("llama_decode failed")
                if all_logits:
                    out += [self._logits_at(i) for i in range(n)]
            finally:
                ll.llama_batch_free(batch)
        return out

    def _check_ids(self, tokens) -> None:
        if any(not 0 <= int(t) < self.n_vocab for t in tokens):
            raise SamfError(f"a token id outside the LLM's vocabulary of {self.n_vocab}")

    def _check_fits(self, head: list, rows, tail: list, max_new_tokens: int) -> None:
        """A request and its longest answer fit in one sequence's context, or one line saying they do not."""
        total = len(head) + len(rows) + len(tail) + max_new_tokens
        if total > self.n_ctx:
            raise SamfError(f"request needs {total} positions but the LLM context holds {self.n_ctx} per sequence")

    def _logits_at(self, i: int) -> np.ndarray:
        """Logits of output ``i`` of the last decode (-1: the last one), copied out of llama.cpp."""
        ptr = self._ll.llama_get_logits_ith(self.llm.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _prefill(self, head: list, rows: np.ndarray, tail: list, all_logits: bool = False, seq: int = 0) -> tuple:
        """Decode ``head`` tokens, ``rows`` and ``tail`` tokens from position 0 in sequence ``seq``, its cache
        cells cleared first; the next position and (with ``all_logits``) the logits after every tail token."""
        self._ll.llama_memory_seq_rm(self._ll.llama_get_memory(self.llm.ctx), seq, -1, -1)
        if head:
            self._decode(0, tokens=list(head), want_logits=False, seq=seq)
        self._decode(len(head), rows=rows, want_logits=not tail, seq=seq)
        pos = len(head) + len(rows)
        steps = []
        if tail:
            steps = self._decode(pos, tokens=list(tail), all_logits=all_logits, seq=seq)
            pos += len(tail)
        return pos, steps

    def _step(self, entries: list) -> list:
        """One decode step for several sequences: ``entries`` is ``[(seq, pos, token)]``, one token each, all in
        one ``llama_batch``; the logits after each, in order."""
        ll = self._ll
        self._check_ids([t for _, _, t in entries])
        if any(pos >= self.n_ctx for _, pos, _ in entries):
            raise SamfError(f"a sequence needs more than the {self.n_ctx} positions the LLM context holds")
        batch = ll.llama_batch_init(len(entries), 0, 1)
        try:
            for i, (seq, pos, token) in enumerate(entries):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, 1
                batch.seq_id[i][0] = seq
            batch.n_tokens = len(entries)
            if ll.llama_decode(self.llm.ctx, batch) != 0:
                raise SamfError("llama_decode failed")
            return [self._logits_at(i) for i in range(len(entries))]
        finally:
            ll.llama_batch_free(batch)

    def generate(self, head: list, rows: np.ndarray, tail: list, stop: set, max_new_tokens: int = 256,
                 return_logits: bool = False) -> dict:
        """Greedy decoding after ``head rows tail`` until a token in ``stop``; ids, text, timings (and the
        logits of every step)."""
        self._check_fits(head, rows, tail, max_new_tokens)
        t0 = time.perf_counter()
        self.adapt_threads()
        pos, _ = self._prefill(head, rows, tail)
        prompt = pos
        t1 = time.perf_counter()

        def advance(token: int):
            nonlocal pos
            self.adapt_threads()
            self._decode(pos, tokens=[token])
            pos += 1
            return self._logits_at(-1)

        ids, logits = greedy_decode(self._logits_at(-1), advance, stop, max_new_tokens, return_logits)
        t2 = time.perf_counter()
        out = dict(ids=ids, text=self.detokenize(ids), prefill_s=t1 - t0, decode_s=t2 - t1,
                   prompt_tokens=prompt, new_tokens=len(ids), decode_steps=pos - prompt)
        if return_logits:
            out["logits"] = np.stack(logits) if logits else np.zeros((0, self.n_vocab), np.float32)
        return out

    def generate_many(self, requests, stop: set, max_new_tokens: int = 256, on_token=None):
        """Greedy decoding of many requests, up to ``n_seq`` at once: yields ``(key, result)`` as each finishes,
        ``result`` as :meth:`generate` gives it (None for a request whose ``rows`` is None: passed through).
        ``on_token(key, ids)``, when given, is called with a request's ids so far each time one is added (a
        service streams them).

        ``requests``: an iterable of ``(key, head, rows, tail)``, drawn only when a sequence is free, so a long
        worklist is never held in memory. Each step decodes one ``llama_batch`` holding the next token of every
        active sequence, each in its own sequence id and KV cells; a finished sequence's slot goes to the next
        request (continuous batching). Decoding is memory bound, so the sequences share each read of the
        weights. A request's prefill runs alone, between two steps."""
        pending, free, active, drained = iter(requests), list(range(self.n_seq))[::-1], {}, False

        def took(state):
            if on_token is not None and state["greedy"].ids:
                on_token(state["key"], state["greedy"].ids)

        while True:
            while free and not drained:
                request = next(pending, None)
                if request is None:
                    drained = True
                    break
                key, head, rows, tail = request
                if rows is None:
                    yield key, None
                    continue
                self._check_fits(head, rows, tail, max_new_tokens)
                seq, t0 = free.pop(), time.perf_counter()
                self.adapt_threads()
                pos, _ = self._prefill(head, rows, tail, seq=seq)
                state = dict(key=key, greedy=Greedy(stop, max_new_tokens), pos=pos, prompt=pos,
                             started=time.perf_counter())
                state["prefill_s"] = state["started"] - t0
                state["token"] = state["greedy"].take(self._logits_at(-1))
                took(state)
                if state["token"] is None:
                    free.append(seq)
                    yield key, self._finished(state)
                else:
                    active[seq] = state
            if not active:
                if drained:
                    return
                continue
            seqs = sorted(active)
            self.adapt_threads()
            t = time.perf_counter()
            logits = self._step([(s, active[s]["pos"], active[s]["token"]) for s in seqs])
            self.step_stats["seconds"] += time.perf_counter() - t
            self.step_stats["tokens"] += len(seqs)
            done = []
            for s, scores in zip(seqs, logits):
                state = active[s]
                state["pos"] += 1
                n = len(state["greedy"].ids)
                state["token"] = state["greedy"].take(scores)
                if len(state["greedy"].ids) > n:
                    took(state)
                if state["token"] is None:
                    done.append(s)
            for s in done:
                free.append(s)
                yield active[s]["key"], self._finished(active.pop(s))

    def _finished(self, state: dict) -> dict:
        ids = state["greedy"].ids
        return dict(ids=ids, text=self.detokenize(ids), prefill_s=state["prefill_s"],
                    decode_s=time.perf_counter() - state["started"], prompt_tokens=state["prompt"],
                    new_tokens=len(ids), decode_steps=state["pos"] - state["prompt"])

    def answer_nll(self, head: list, rows: np.ndarray, tail: list, answer_ids: list, end: int) -> float:
        """Mean negative log-likelihood per token of ``answer_ids`` + ``end`` after ``head rows tail``
        (teacher forcing): how much a quantization costs, measured rather than assumed."""
        return self.choice_nll(head, rows, tail, [answer_ids], end)[0]

    def choice_nll(self, head: list, rows: np.ndarray, tail: list, choices: list, end: int) -> list:
        """Mean negative log-likelihood per token of each of ``choices`` (token id lists) + ``end`` after
        ``head rows tail``: the request is decoded once, and each choice from its end, its cells removed after.
        How a multiple-choice answer is picked among the offered ones (the lowest wins), as evaluation
        harnesses score options, rather than hoping a generated letter matches its text."""
        if not tail or not choices:
            raise SamfError("choice_nll needs a prompt token after the image rows and at least one choice")
        self._check_fits(head, rows, tail, max(len(c) for c in choices) + 1)
        pos, steps = self._prefill(head, rows, tail, all_logits=True)
        memory = self._ll.llama_get_memory(self.llm.ctx)
        out = []
        for ids in choices:
            # Logits after the last tail token predict ids[0]; after ids[i], ids[i+1] (or the end token).
            logits = np.stack(steps[-1:] + self._decode(pos, tokens=list(ids), all_logits=True)).astype(np.float64)
            self._ll.llama_memory_seq_rm(memory, 0, pos, -1)  # the next choice continues the same request
            targets = np.asarray(list(ids) + [end])
            logp = logits - logits.max(1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(1, keepdims=True))
            out.append(-float(np.mean(logp[np.arange(len(targets)), targets])))
        return out

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


class GGUFTokenEmbeddings:
    """Rows of a GGUF's ``token_embd`` table as float32, dequantizing where needed.

    The fusion module needs the prompt's token embeddings; reading them from the same GGUF the LLM runs
    keeps the runtime free of torch and of a second copy of the table. The file is memory-mapped once.

    ``location`` (``type``, ``shape``, ``offset``; the bundle's manifest records it at export) maps the table
    directly; without it the GGUF's header is parsed with gguf-py, which takes about a second for Phi-3's
    32064-token vocabulary.
    """

    def __init__(self, gguf_path: str, location: dict | None = None):
        import gguf

        self._dequantize = gguf.quants.dequantize
        if location is None:
            location = token_embd_location(gguf_path)
        try:
            self._type = gguf.GGMLQuantizationType[location["type"]]
            rows, cols = (int(n) for n in location["shape"])
            block, type_bytes = gguf.GGML_QUANT_SIZES[self._type]
            self._rows = np.memmap(gguf_path, dtype=np.uint8, mode="r", offset=int(location["offset"]),
                                   shape=(rows, cols // block * type_bytes))
        except (KeyError, ValueError, TypeError, OSError) as e:
            raise SamfError(f"{gguf_path}: cannot map its token embeddings ({e})") from None

    def close(self) -> None:
        self._rows = None  # the map goes with its last reference

    def __call__(self, ids: list) -> np.ndarray:
        rows = np.asarray(self._rows[np.asarray(ids, dtype=np.int64)])
        return self._dequantize(rows, self._type).astype(np.float32).reshape(len(ids), -1)


def gguf_tensor_infos(path: str) -> dict:
    """name -> (type name, numpy-order shape, byte offset, byte count) of every tensor in a GGUF, from its
    header alone.

    The header is walked with gguf-py's type tables, stepping over the metadata values: gguf-py's reader builds
    a numpy view of every token of the vocabulary, 1.6 s per file at Phi-3's 32k tokens, and the export reads
    each GGUF's tensor table several times."""
    import mmap
    import struct

    import gguf

    vt = gguf.GGUFValueType
    sizes = {t: np.dtype(d).itemsize for t, d in gguf.GGUFReader.gguf_scalar_to_np.items()}  # gguf-py's table
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            u32 = lambda o: struct.unpack_from("<I", buf, o)[0]  # noqa: E731
            u64 = lambda o: struct.unpack_from("<Q", buf, o)[0]  # noqa: E731

            def text(o):
                n = u64(o)
                if o + 8 + n > len(buf):
                    raise ValueError("a string runs past the end of the file")
                return bytes(buf[o + 8: o + 8 + n]).decode("utf-8"), o + 8 + n

            def skip(o, t):
                t = vt(t)
                if t in sizes:
                    return o + sizes[t]
                if t == vt.STRING:
                    return o + 8 + u64(o)
                item, n = vt(u32(o)), u64(o + 4)
                o += 12
                if item in sizes:
                    return o + n * sizes[item]
                for _ in range(n):
                    o = skip(o, item)
                return o

            if u32(0) != gguf.GGUF_MAGIC or u32(4) not in (2, 3):
                raise ValueError("not a little-endian GGUF of version 2 or 3")
            n_tensors, n_kv, o = u64(8), u64(16), 24
            alignment = gguf.GGUF_DEFAULT_ALIGNMENT
            for _ in range(n_kv):
                key, o = text(o)
                t = u32(o)
                if key == "general.alignment" and t == vt.UINT32:
                    alignment = u32(o + 4)
                o = skip(o + 4, t)
            raw = []
            for _ in range(n_tensors):
                name, o = text(o)
                n_dims = u32(o)
                dims = struct.unpack_from(f"<{n_dims}Q", buf, o + 4)
                o += 4 + 8 * n_dims
                raw.append((name, dims, gguf.GGMLQuantizationType(u32(o)), u64(o + 4)))
                o += 12
            start = -(-o // alignment) * alignment
    except (OSError, ValueError, struct.error) as e:
        raise SamfError(f"{path}: not a readable GGUF ({e})") from None
    infos = {}
    for name, dims, kind, offset in raw:
        block, type_bytes = gguf.GGML_QUANT_SIZES[kind]
        count = 1
        for d in dims:
            count *= d
        infos[name] = (kind.name, tuple(int(d) for d in reversed(dims)), start + offset, count * type_bytes // block)
    return infos


def token_embd_location(gguf_path: str) -> dict:
    """Where a GGUF keeps ``token_embd.weight``: its type name, numpy-order shape and byte offset."""
    info = gguf_tensor_infos(gguf_path).get("token_embd.weight")
    if info is None:
        raise SamfError(f"{gguf_path} has no token_embd.weight tensor")
    return dict(type=info[0], shape=list(info[1]), offset=info[2])
