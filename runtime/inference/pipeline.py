"""The report pipeline: scan -> slices -> encoder engines -> fused embeddings -> llama.cpp -> text.

No torch: ONNX Runtime (or TensorRT) runs the encoders, llama.cpp the LLM. Every stage is timed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from samf.errors import BundleError, EngineUnavailable, SamfError

from ..bundle.bundle import Bundle, read_bundle
from ..bundle.manifest import ENCODER_PRECISIONS
from ..options import option
from ..scan.ct import Volume, load_scan
from ..scan.preprocess import preprocess_placed
from .evidence import NO_ATTENTION, Evidence, evidence_of
from .prompt import LETTERS, REPORT_REQUESTS, PromptLayout, mcq_answer, mcq_choice_of, mcq_request

#: The fields of :meth:`Result.to_record`, in order; ``choice_nll`` only where the result has it (docs/DESIGN.md,
#: "The result record").
RECORD_FIELDS = ("report", "new_tokens", "encoders", "timings", "identity", "scan", "evidence", "choice_nll")


@dataclass
class Result:
    text: str
    token_ids: list
    timings: dict = field(default_factory=dict)   # seconds per stage
    identity: dict = field(default_factory=dict)  # bundle/model identity
    prompt_tokens: int = 0                        # positions before the first new token (image rows included)
    decode_steps: int = 0                         # single-token forward passes after the prefill
    scan: dict = field(default_factory=dict)      # what was read: format, shape, spacing, series (no identifiers)
    evidence: Evidence | None = None              # the fusion's attention over the slices (None: an older bundle)
    slices: np.ndarray | None = None              # the model's input [3·S, C, H, W], when asked to keep them
    choice_nll: dict | None = None                # a multiple-choice answer's score per letter (lower: likelier)

    def evidence_record(self) -> dict | None:
        """The evidence as JSON (:meth:`Evidence.to_dict`), or None for a bundle without attention outputs."""
        return None if self.evidence is None else self.evidence.to_dict()

    def to_record(self) -> dict:
        """The result as JSON (:data:`RECORD_FIELDS`): the one shape ``samf report --json``, the batch's rows and
        the service's jobs give. Each adds its own fields around it (the input's path, the job's status, ...),
        never renaming these. Seconds are rounded to 0.1 ms; no path or identifier of the scan is in it."""
        record = dict(report=self.text, new_tokens=len(self.token_ids),
                      encoders=self.identity.get("encoder_precision"),
                      timings={k: round(v, 4) for k, v in self.timings.items()}, identity=dict(self.identity),
                      scan=dict(self.scan), evidence=self.evidence_record())
        if self.choice_nll is not None:
            record["choice_nll"] = dict(self.choice_nll)
        return record

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: forward passes per second after the prefill (whose logits give the first token)."""
        d = self.timings.get("llm_decode", 0.0)
        return self.decode_steps / d if d > 0 and self.decode_steps else float("nan")


#: How :meth:`ReportPipeline.answer` picks a multiple-choice answer (the first is the default).
MCQ_METHODS = ("choices", "generate")


#: What ``--encoders auto`` picks, in order of preference, among what the bundle has (a variant is there only if
#: it held its tolerance at export): fp16 where the encoders run on a GPU (ONNX Runtime CUDA, TensorRT); on a CPU
#: bf16 (the fp32 files on OpenVINO, where it is installed: 2x ONNX Runtime fp32 on the paper ViT,
#: ``benchmarks/encoder-precision.md``), then int8, then fp32.
AUTO_PRECISION = {"gpu": ("fp16", "fp32"), "cpu": ("bf16", "int8", "fp32")}


def _runs_here(bundle: Bundle, precision: str) -> bool:
    """Whether this machine has the backend a precision's files are made for (OpenVINO is optional)."""
    if bundle.encoder_backend(precision) != "openvino":
        return True
    from samf.engines.openvino_engine import openvino_version

    return openvino_version() is not None


def choose_precision(bundle: Bundle, requested: str, gpu: bool) -> str:
    """The encoders' precision to run: ``requested`` (``auto``, ``fp32``, ``fp16``, ``int8``, ``bf16``) among the
    bundle's. A precision the bundle lacks is refused in one line, with the figure that kept it out of the export;
    one whose backend is not installed here, in one line saying what to install."""
    have = bundle.encoder_precisions()
    if requested == "auto":
        return next(p for p in AUTO_PRECISION["gpu" if gpu else "cpu"] if p in have and _runs_here(bundle, p))
    if requested not in have:
        why = bundle.rejected_encoders().get(requested)
        raise BundleError(f"bundle has no {requested} encoders (it has {', '.join(have)})"
                          + (f": its export measured {why}" if why else ""))
    if not _runs_here(bundle, requested):
        from samf.engines.openvino_engine import import_openvino

        import_openvino()  # raises EngineUnavailable: one line naming the extra to install
    return requested


def host(value) -> np.ndarray:
    """A stage output as numpy, wherever it lives (ONNX Runtime keeps them on the encoders' device)."""
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


#: Positions kept for the prompt around the image rows (scaffolding and request) when n_ctx is derived.
PROMPT_ROOM = 256


#: The backends the encoders run on (``PipelineConfig.backend``).
BACKENDS = ("onnxruntime", "tensorrt")


@dataclass
class PipelineConfig:
    """How a :class:`ReportPipeline` runs: one place for every knob and its default. A field made with
    :func:`~samf.runtime.options.option` is also the option of ``samf report``, ``vqa``, ``serve`` and ``bench``
    that sets it (:func:`samf.cli.common.config_options`), so its default and help are written here only.

    ``n_ctx``: positions the LLM's cache holds (image rows, prompt and answer); None sizes it from the bundle
    (its image tokens, :data:`PROMPT_ROOM`, and ``max_new_tokens``). A request that needs more is refused in
    one line. The KV cache costs 0.4 GB per 1024 positions at Phi-3-mini's size.
    ``repack``: faster decoding of 4-bit GGUFs on CPU for 2 s more of loading (see
    :class:`~samf.engines.llama_cpp_engine.LlamaCppLLM`); worth it when one load serves several scans.
    ``parallel``: reports :meth:`ReportPipeline.report_many` decodes together (llama.cpp sequences, each with
    its own ``n_ctx`` KV cells: 0.4 GB per 1024 positions at Phi-3-mini's size). A caller that reports one scan
    at a time (``samf report SCAN``, ``vqa``, the demo) asks for 1: it never uses a second sequence.
    ``prefetch``: scans loaded and preprocessed ahead, in worker threads, while the engines work.
    ``trusted_keys``: public key files, one of which must have signed the bundle's manifest."""

    quant: str | None = option(None, "which GGUF in the bundle (default: the manifest's)", type=str)
    backend: str = option("onnxruntime", "engine for the ViT, aggregator and fusion", choices=BACKENDS)
    encoders: str = option("auto", "the encoders' precision: auto is fp16 on a GPU (CUDA, TensorRT); on a CPU bf16 "
                                   "(OpenVINO, where installed), else int8, else fp32, among what the bundle has (the "
                                   "export keeps a variant only if it held its tolerance)",
                           choices=("auto", *ENCODER_PRECISIONS))  # choose_precision
    n_threads: int | None = option(None, "CPU threads for the engines (default: all cores); more than the cores "
                                         "this process may use are capped to them",
                                   name="--threads", type=int, min=1, max=1024)
    n_gpu_layers: int = option(0, "LLM layers offloaded to the GPU (llama.cpp built with CUDA; -1: all)",
                               name="--gpu-layers", min=-1, max=100000)
    n_ctx: int | None = None
    # 256: what samf report and samf serve decoded at most, and what report() and report_many() did unless told;
    # 512 here only sized the context for reports twice as long as any of them asked for (issue 30).
    max_new_tokens: int = option(256, "the longest report, in tokens; the LLM's context is sized for it (samf serve: "
                                      "the most a request may ask for, and what one asking for none gets)",
                                 name="--max-tokens", min=1, max=3072)
    #: The longest answer :meth:`ReportPipeline.answer` decodes with ``method="generate"``: a letter and one
    #: choice (``C. text.``), a different thing from a report's length.
    answer_tokens: int = 32
    repack: bool = True
    # 4: what samf report's batches and samf serve decoded together (benchmarks/batch-throughput.md measured the
    # batch at --parallel 4: 11.5x 24 separate runs on the demo; K = 4 the best of 1, 2, 4, 8). It was 1 here, which
    # the commands never used; a pipeline that reports one scan at a time asks for 1 (above).
    parallel: int = option(4, "reports decoded together in a batch (each holds its own KV cache)", min=1, max=64)
    prefetch: int = 2
    verify_hashes: bool = True
    trusted_keys: tuple = ()

    def context_for(self, image_tokens: int) -> int:
        return self.n_ctx or image_tokens + PROMPT_ROOM + max(self.max_new_tokens, self.answer_tokens)


class ReportPipeline:
    """Load a bundle once, then turn scans into reports or multiple-choice answers.

    ``ReportPipeline(bundle, config)`` or ``ReportPipeline(bundle, quant=..., n_threads=...)`` (the fields of
    :class:`PipelineConfig`). A context manager: ``with ReportPipeline(b) as pipe: ...`` frees every engine and
    descriptor at the end; so does :meth:`close`, and a load that fails half-way."""

    def __init__(self, bundle: str | Bundle, config: PipelineConfig | None = None, **options):
        self.config = PipelineConfig(**{**vars(config or PipelineConfig()), **options})
        t0 = time.perf_counter()
        self._open: list = []
        self.vit = self.aggregator = self.fusion = self.llm = self.embed = None
        self.precision, self._bound = None, None
        try:
            self._load(bundle)
        except BaseException:
            self.close()  # what was opened before the failure: descriptors, sessions, the model
            raise
        self.load_s = time.perf_counter() - t0

    def _load(self, bundle) -> None:
        from samf.engines.llama_cpp_engine import REPACKED_ON_CPU, GGUFTokenEmbeddings, LlamaCppLLM

        cfg = self.config
        self.bundle = (bundle if isinstance(bundle, Bundle)
                       else read_bundle(bundle, False, trusted_keys=tuple(cfg.trusted_keys)))
        self.pre = self.bundle.preprocess
        # Where the image rows, the prompt and the answer sit, and which tokens end generation.
        self.layout = PromptLayout.from_dict(self.bundle.manifest["prompt"]["layout"])
        quant = self.bundle.llm_quant(cfg.quant)
        # Each artifact is opened once, verified through that descriptor, and loaded through it
        # (/proc/self/fd/N): a file swapped at the bundle's path after its check is not what runs. (Loading
        # ONNX models from the hashed bytes instead kept a second copy of ViT-B/16 resident: +0.35 GB.)
        self._load_encoders(cfg.encoders)
        llm = self._artifact(self.bundle.llm_name(quant), cfg.verify_hashes)
        llm_path = llm.path
        four_bit = cfg.n_gpu_layers == 0 and quant.startswith(REPACKED_ON_CPU)
        self.llm = LlamaCppLLM(llm_path, n_ctx=cfg.context_for(self.bundle.image_tokens), n_threads=cfg.n_threads,
                               n_gpu_layers=cfg.n_gpu_layers, repack=cfg.repack if four_bit else None,
                               n_seq=cfg.parallel)
        self.embed = GGUFTokenEmbeddings(llm_path, self.bundle.token_embd(quant))
        self._check_engines_fit()
        self.identity = dict(bundle=self.bundle.root, created=self.bundle.manifest.get("created"),
                             llm=llm.name, encoders=getattr(self.vit, "provider", cfg.backend),
                             encoder_precision=self.precision, signed_by=self.bundle.signed_by,
                             bundle_sha256=self.bundle.manifest.get("integrity", {}).get("manifest_sha256"))

    def _artifact(self, name: str, verify: bool):
        art = self.bundle.open(name, verify=verify)
        self._open.append(art)
        return art

    def _check_engines_fit(self) -> None:
        """The loaded engines take what the manifest says they take: else one line now, not an error deep
        inside ONNX Runtime or llama.cpp at the first scan."""
        d_llm = self.bundle.manifest["model"]["image"]["fusion"]["d_llm"]
        if self.llm.n_embd != d_llm:
            raise BundleError(f"{self.bundle.root}: the LLM is {self.llm.n_embd} wide, the fusion writes {d_llm}-wide "
                              "rows (an LLM from another model?)")
        inputs = getattr(self.vit, "inputs", {})
        shape = list(getattr(inputs.get("slices"), "shape", None) or [])
        want = [self.pre.channels, self.pre.image_size, self.pre.image_size]
        if len(shape) == 4 and all(isinstance(n, int) for n in shape[1:]) and shape[1:] != want:
            raise BundleError(f"{self.bundle.root}: vit.onnx takes slices of {shape[1:]}, the preprocessing makes "
                              f"{want}")

    def _load_encoders(self, requested: str) -> None:
        """The vit, aggregator and fusion of the chosen precision (see :func:`choose_precision`)."""
        from samf.engines import load_encoder_module

        cfg = self.config
        backend = cfg.backend
        if cfg.backend == "tensorrt":
            entry = self._trt_plans(requested)  # plans are executable: never load one that changed
            precision, files = entry.get("precision", "fp32"), entry["plans"]
            kw = {}
        else:
            from samf.engines.onnxruntime_engine import available_providers

            gpu = available_providers()[0] == "CUDAExecutionProvider"
            precision = choose_precision(self.bundle, requested, gpu)
            files, kw = self.bundle.encoder_files(precision), dict(threads=cfg.n_threads or 0)
            if self.bundle.encoder_backend(precision) == "openvino":
                backend, kw = "openvino", dict(kw, precision=precision)
        self.set_encoders({n: load_encoder_module(backend, self._artifact(f, cfg.verify_hashes).path, **kw)
                           for n, f in files.items()}, precision)

    def set_encoders(self, modules: dict, precision: str) -> None:
        """Run ``modules`` (``{"vit": ..., "aggregator": ..., "fusion": ...}``) from now on, closing the ones
        before. The export checks each precision variant through this, with the runtime's own stages."""
        for old in (self.vit, self.aggregator, self.fusion):
            if old is not None and old not in modules.values():
                old.close()
        self.vit, self.aggregator, self.fusion = modules["vit"], modules["aggregator"], modules["fusion"]
        self.precision = precision
        self._bound = None  # (D2, z3d shape) when every stage can keep its outputs on the device
        if all(hasattr(m, "run_bound") for m in modules.values()):
            d2 = self.vit.outputs["z2d"].shape[-1]
            z3d = [1, *self.aggregator.outputs["z3d"].shape[1:]]
            if all(isinstance(n, int) for n in [d2, *z3d]):
                self._bound = (d2, tuple(z3d))

    @property
    def has_attention(self) -> bool:
        """Whether the fusion outputs its attention (bundles exported before it did output the fused rows only)."""
        return "alpha" in self.fusion.outputs

    def require_attention(self) -> None:
        """One line, before any scan is read, when evidence is asked of a bundle without attention outputs."""
        if not self.has_attention:
            raise BundleError(NO_ATTENTION)

    def _trt_plans(self, requested: str) -> dict:
        """The manifest's entry for the plans built with the installed TensorRT (plans are not portable across
        versions), in the requested precision (``auto``: fp16 if built, else fp32)."""
        from samf.engines.tensorrt_engine import INSTALL_HINT, tensorrt_version

        version = tensorrt_version()
        if version is None:
            raise EngineUnavailable(INSTALL_HINT)
        built = {e.get("precision", "fp32"): e for e in self.bundle.manifest.get("engines", {}).get("tensorrt", [])
                 if e.get("tensorrt") == version}
        if not built:
            raise SamfError(f"bundle has no TensorRT {version} plans: run `samf-export build-engines` on this machine")
        want = [p for p in AUTO_PRECISION["gpu"] if p in built] if requested == "auto" else [requested]
        if not want or want[0] not in built:
            raise SamfError(f"bundle has no {requested} TensorRT {version} plans; it has {', '.join(sorted(built))} "
                            "(`samf-export build-engines --precision` builds others)")
        return dict(built[want[0]])

    # ------------------------------------------------------------------------------ stages
    def encode(self, slices: np.ndarray, timings: dict) -> tuple:
        """Slices ``[K, C, H, W]`` -> (z2d ``[1, K, D2]``, z3d ``[1, N, D3]``). On ONNX Runtime both stay on the
        encoders' device (the GPU on CUDA) for :meth:`image_prefix`; :func:`host` brings one back."""
        x = np.ascontiguousarray(slices, dtype=np.float32)
        t = time.perf_counter()
        if self._bound is None:  # TensorRT: numpy in, numpy out
            z2d = self.vit(slices=x)[None]
            timings["vit"] = time.perf_counter() - t
            t = time.perf_counter()
            z3d = self.aggregator(z2d=z2d)
        else:
            d2, z3d_shape = self._bound
            z2d = self.vit.device_array((1, len(x), d2))
            self.vit.run_bound({"slices": x}, {"z2d": (z2d, (len(x), d2))})  # [K, D2] written as [1, K, D2]
            timings["vit"] = time.perf_counter() - t
            t = time.perf_counter()
            z3d = self.aggregator.device_array(z3d_shape)
            self.aggregator.run_bound({"z2d": z2d}, {"z3d": (z3d, z3d_shape)})
        timings["aggregator"] = time.perf_counter() - t
        return z2d, z3d

    def image_prefix(self, z2d, z3d, prompt_ids: list, timings: dict) -> np.ndarray:
        """The fused image rows ``[N, d_llm]`` for this prompt, from :meth:`encode`'s outputs."""
        return self.fuse(z2d, z3d, prompt_ids, timings)["fused"][0]

    def fuse(self, z2d, z3d, prompt_ids: list, timings: dict) -> dict:
        """Every output of the fusion for this prompt, as numpy: ``fused [1, N, d_llm]``, and the attention
        ``alpha``/``gamma [1, K]`` where the bundle's fusion outputs it (see
        :mod:`~samf.runtime.inference.evidence`)."""
        t = time.perf_counter()
        feeds = dict(z2d=z2d, z3d=z3d, text=self.embed(prompt_ids)[None],
                     text_mask=np.ones((1, len(prompt_ids)), np.int64))
        out = self.fusion.outputs_of(**feeds) if self._bound is None else self.fusion.run_bound(feeds)
        timings["fusion"] = time.perf_counter() - t
        return out

    def _slices(self, scan, load=None) -> tuple:
        """Scan (a path, read with ``load`` or :func:`load_scan`, or a :class:`Volume`) -> (slices, timings,
        scan info, where the slices are)."""
        vol = scan if isinstance(scan, Volume) else (load or load_scan)(str(scan))
        timings = {"load": vol.info.get("load_s", 0.0)}
        t = time.perf_counter()
        slices, placement = preprocess_placed(vol, self.pre)
        timings["preprocess"] = time.perf_counter() - t
        info = dict(format=vol.info.get("format"), shape=list(vol.hu.shape),
                    spacing_mm=[round(float(x), 4) for x in vol.spacing], intensity=vol.intensity)
        if vol.info.get("choice"):
            info["series"] = vol.info["choice"]  # names a series by UID only with --verbose
        return slices, timings, info, placement

    def _image_rows(self, slices: np.ndarray, placement, prompt_ids: list, timings: dict) -> tuple:
        """What :meth:`_slices` read -> (the fused image rows ``[N, d_llm]`` for this prompt, the evidence),
        timing the encoders. :meth:`_prefix` and :meth:`report_many` both go through it."""
        z2d, z3d = self.encode(slices, timings)
        out = self.fuse(z2d, z3d, prompt_ids, timings)
        return out["fused"][0], evidence_of(out, placement)

    def _prefix(self, scan, request: str, timings: dict) -> tuple:
        """Scan + request -> (fused image embeddings, ids of the prompt text, scan info, evidence, slices), timing
        each stage."""
        slices, loaded, info, placement = self._slices(scan)
        timings.update(loaded)
        prompt_ids = self.llm.tokenize(self.layout.prompt_text(request))
        fused, evidence = self._image_rows(slices, placement, prompt_ids, timings)
        return fused, prompt_ids, info, evidence, slices

    def generate(self, prefix: np.ndarray, prompt_ids: list, max_new_tokens: int, stop_at_end: bool = True) -> dict:
        """Greedy decoding after the image rows ``prefix`` and the prompt: llama.cpp's result dict."""
        lay = self.layout
        stop = lay.stop_ids() if stop_at_end else set()
        return self.llm.generate(lay.head(), prefix, lay.tail(prompt_ids), stop, max_new_tokens)

    def _run(self, scan, request: str, max_new_tokens: int, stop_at_end: bool = True,
             keep_slices: bool = False) -> Result:
        timings: dict = {}
        prefix, prompt_ids, info, evidence, slices = self._prefix(scan, request, timings)
        out = self.generate(prefix, prompt_ids, max_new_tokens, stop_at_end)
        return self._generated(out, timings, info, evidence, slices if keep_slices else None)

    def _generated(self, out: dict, timings: dict, info: dict, evidence, slices, started: float | None = None
                   ) -> Result:
        """The :class:`Result` of a greedy answer (llama.cpp's ``out``), its timings completed; ``started``: when
        the scan was submitted (``report_many``), for the ``wall`` time, queueing included."""
        timings.update(llm_prefill=out["prefill_s"], llm_decode=out["decode_s"])
        timings["total"] = sum(timings.values())
        if started is not None:
            timings["wall"] = time.perf_counter() - started
        return Result(text=out["text"], token_ids=out["ids"], timings=timings, identity=self.identity,
                      prompt_tokens=out["prompt_tokens"], decode_steps=out["decode_steps"], scan=info,
                      evidence=evidence, slices=slices)

    # ------------------------------------------------------------------------------ entry points
    def report(self, scan, request: str | None = None, max_new_tokens: int | None = None, stop_at_end: bool = True,
               keep_slices: bool = False) -> Result:
        """The findings report for one scan (a path or a :class:`Volume`), at most ``max_new_tokens`` long
        (default: the config's); ``stop_at_end=False`` decodes exactly ``max_new_tokens`` whatever the model says
        (speed measurements on random weights); ``keep_slices``: the result keeps the slices the model read
        (``Result.slices``)."""
        return self._run(scan, request or REPORT_REQUESTS[0], max_new_tokens or self.config.max_new_tokens,
                         stop_at_end, keep_slices)

    def answer(self, scan, question: str, choices, max_new_tokens: int | None = None,
               method: str = MCQ_METHODS[0]) -> tuple:
        """A multiple-choice answer: (the letter picked or None, the full result).

        ``method="choices"`` (the default): each offered answer, written as training writes it (``"C. text."``), is
        scored by the LLM's mean log-likelihood per token after the image and the question, and the likeliest is
        the answer (``Result.choice_nll`` keeps the four scores). It is always one of the four, its letter and text
        agree, and it costs one prefill. ``"generate"``: the first ``"X."`` of the greedy answer, M3D's protocol,
        which a small model may get right in its text and wrong in its letter (``benchmarks/learning.md``), at most
        ``max_new_tokens`` long (default: the config's ``answer_tokens``)."""
        if len(choices) != 4:
            raise SamfError("a multiple-choice question needs exactly four choices")
        if method not in MCQ_METHODS:
            raise SamfError(f"unknown multiple-choice method {method!r}; one of {', '.join(MCQ_METHODS)}")
        request = mcq_request(question, choices)
        if method == "generate":
            res = self._run(scan, request, max_new_tokens or self.config.answer_tokens)
            return mcq_choice_of(res.text), res
        timings: dict = {}
        prefix, prompt_ids, info, evidence, _ = self._prefix(scan, request, timings)
        lay, t0 = self.layout, time.perf_counter()
        answers = [mcq_answer(letter, choices) for letter in LETTERS]
        nll = self.llm.choice_nll(lay.head(), prefix, lay.tail(prompt_ids), [self.llm.tokenize(a) for a in answers],
                                  lay.answer_end)
        timings["llm_prefill"] = time.perf_counter() - t0
        timings["total"] = sum(timings.values())
        best = int(np.argmin(nll))
        res = Result(text=answers[best], token_ids=self.llm.tokenize(answers[best]), timings=timings,
                     identity=self.identity, prompt_tokens=len(lay.head()) + len(prefix) + len(lay.tail(prompt_ids)),
                     scan=info, evidence=evidence, choice_nll=dict(zip(LETTERS, (round(v, 4) for v in nll))))
        return LETTERS[best], res

    def report_many(self, scans, request: str | None = None, max_new_tokens: int | None = None,
                    stop_at_end: bool = True, load=None, on_text=None, keep_slices: bool = False):
        """Reports for many scans with one load of the engines: yields ``(scan, Result)`` or ``(scan, error)``
        (a :class:`SamfError` or other exception, with its one-line reason) as each finishes, not in order.

        ``scans``: paths or :class:`Volume` objects, drawn lazily; ``load``: how a path is read (default
        :func:`load_scan`). Scans are read and preprocessed ``config.prefetch`` ahead in worker threads while
        the engines work, the encoders run as a scan's turn comes, and llama.cpp decodes up to
        ``config.parallel`` reports together (:meth:`LlamaCppLLM.generate_many`): a report finished frees its
        sequence for the next scan. At most ``parallel + prefetch`` scans are held at a time, whatever the length
        of ``scans``. Greedy reports, at most ``max_new_tokens`` long (default: the config's), are the ones
        :meth:`report` gives. ``on_text(scan, text so far)`` is called
        as each token of a report is decoded. ``keep_slices``: each result keeps the slices the model read
        (``Result.slices``, for evidence images and PDFs; 14 MB a scan at the paper's size)."""
        import collections
        from concurrent.futures import ThreadPoolExecutor

        lay, request = self.layout, request or REPORT_REQUESTS[0]
        max_new_tokens = max_new_tokens or self.config.max_new_tokens
        stop = lay.stop_ids() if stop_at_end else set()
        prompt_ids = self.llm.tokenize(lay.prompt_text(request))
        waiting: dict = {}  # key -> (scan, timings, started) or (scan, error)

        def requests(pool):
            queue, todo = collections.deque(), iter(enumerate(scans))

            def fill():
                while len(queue) < max(1, self.config.prefetch):
                    item = next(todo, None)
                    if item is None:
                        return
                    queue.append((*item, time.perf_counter(), pool.submit(self._slices, item[1], load)))

            fill()
            while queue:
                key, scan, started, future = queue.popleft()
                fill()
                try:
                    slices, timings, info, placement = future.result()
                    del future
                    fused, evidence = self._image_rows(slices, placement, prompt_ids, timings)
                except Exception as e:  # noqa: BLE001 - one bad scan must not end the batch; its reason is kept
                    waiting[key] = (scan, e)
                    yield key, None, None, None
                    continue
                waiting[key] = (scan, timings, started, info, evidence, slices if keep_slices else None)
                yield key, lay.head(), fused, lay.tail(prompt_ids)

        with ThreadPoolExecutor(max_workers=max(1, self.config.prefetch), thread_name_prefix="samf-load") as pool:
            streamed = None if on_text is None else (
                lambda key, ids: on_text(waiting[key][0], self.llm.detokenize(ids)))
            for key, out in self.llm.generate_many(requests(pool), stop, max_new_tokens, on_token=streamed):
                entry = waiting.pop(key)
                if out is None:
                    yield entry
                    continue
                scan, timings, started, info, evidence, kept = entry
                yield scan, self._generated(out, timings, info, evidence, kept, started)

    def report_nll(self, scan, reference: str, request: str | None = None) -> float:
        """Teacher-forced negative log-likelihood per token of a reference report for this scan."""
        prefix, prompt_ids, *_ = self._prefix(scan, request or REPORT_REQUESTS[0], {})
        lay = self.layout
        return self.llm.answer_nll(lay.head(), prefix, lay.tail(prompt_ids), self.llm.tokenize(reference),
                                   lay.answer_end)

    def close(self) -> None:
        """Free the engines (the LLM's model and KV cache, the encoder sessions, the token-embedding map) and
        the artifacts' descriptors. Safe to call twice."""
        for engine in (self.llm, self.embed, self.vit, self.aggregator, self.fusion):
            if engine is not None and hasattr(engine, "close"):
                engine.close()
        self.vit = self.aggregator = self.fusion = self.llm = self.embed = None
        for art in self._open:
            art.close()
        self._open = []

    def __enter__(self) -> "ReportPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
