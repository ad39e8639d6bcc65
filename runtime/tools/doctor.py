"""``samf doctor``: whether this machine can run the service, checked before it is installed or started.

Each check is ``(name, status, detail)``, status ``ok``, ``warn`` or ``fail``; a ``fail`` is a blocker (the
command exits 1 with one line per blocker). Checks: the CPU's features and llama.cpp's CPU backend
(``llama_print_system_info``), GPUs and the ONNX Runtime / TensorRT / CUDA providers present, memory and disk
against what the bundle needs, the bundle verified (every artifact re-hashed; its signature with
``--trusted-key``), the ports free, and a C-ECHO to the DICOM destination.
"""

from __future__ import annotations

import os
import shutil
import socket

from ..service.config import ServiceConfig, default_service_dir

OK, WARN, FAIL = "ok", "warn", "fail"


def _cpu(checks: list) -> None:
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni")
    have = [f for f in wanted if f in flags]
    if flags and "avx2" not in flags:
        checks.append(("cpu", WARN, "no AVX2: llama.cpp and ONNX Runtime run far slower"))
    else:
        checks.append(("cpu", OK, f"{os.cpu_count()} cores; {', '.join(have) or 'features unknown'}"))
    try:
        from samf.engines.llama_cpp_engine import _llama_cpp, loaded_cpu_variant

        llama_cpp = _llama_cpp()  # a portable build's backends registered, its CPU variant chosen
        info = llama_cpp.llama_print_system_info()
        info = info.decode() if isinstance(info, bytes) else str(info)
        parts = info.replace("CPU :", "").split("|")
        on = [p.split("=")[0].strip() for p in parts if p.strip().endswith("= 1")]
        variant = loaded_cpu_variant()
        build = f"portable, variant {variant}" if variant else "native"
        checks.append(("llama.cpp", OK, f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')} ({build}), "
                                        f"CPU backend: {', '.join(on) or info.strip()}"))
    except Exception as e:  # noqa: BLE001 - a missing or broken build is the finding
        checks.append(("llama.cpp", FAIL, f"llama_cpp not usable ({type(e).__name__}: {e})".splitlines()[0]))


def _accelerators(checks: list) -> None:
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        checks.append(("onnxruntime", OK, f"{ort.__version__}; providers: {', '.join(providers)}"))
        checks.append(("tensorrt", OK if "TensorrtExecutionProvider" in providers else WARN,
                       "TensorRT provider present" if "TensorrtExecutionProvider" in providers else
                       "no TensorRT provider (--backend tensorrt unavailable; onnxruntime on CPU is)"))
    except Exception as e:  # noqa: BLE001
        checks.append(("onnxruntime", FAIL, f"onnxruntime not usable ({type(e).__name__})"))
    gpus = []
    if os.path.isdir("/proc/driver/nvidia/gpus"):
        gpus = os.listdir("/proc/driver/nvidia/gpus")
    nvsmi = shutil.which("nvidia-smi")
    if gpus or nvsmi:
        checks.append(("gpu", OK, f"{len(gpus) or '?'} NVIDIA GPU(s) (driver present)"))
    else:
        checks.append(("gpu", OK, "no GPU: the CPU runs everything (supported)"))


def _memory_and_disk(checks: list, bundle_bytes: int | None, work: str) -> None:
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is not None:
        need = int(bundle_bytes * 1.5) + (1 << 30) if bundle_bytes else None
        if need and avail < need:
            checks.append(("memory", FAIL, f"{avail / 2**30:.1f} GiB available, the bundle needs about "
                                           f"{need / 2**30:.1f} GiB (its files x 1.5 + 1 GiB)"))
        else:
            checks.append(("memory", OK, f"{avail / 2**30:.1f} GiB available"
                                         + (f" (the bundle needs about {need / 2**30:.1f})" if need else "")))
    probe = os.path.abspath(work)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    need_disk = 2 << 30
    checks.append(("disk", OK if free >= need_disk else FAIL,
                   f"{free / 2**30:.1f} GiB free under {probe}" + ("" if free >= need_disk else
                                                                 " (at least 2 GiB for the queue and uploads)")))


def _bundle(checks: list, bundle: str, trusted_keys) -> int | None:
    from samf.errors import SamfError
    from samf.runtime.bundle.bundle import read_bundle, verify_all

    try:
        b = read_bundle(bundle, verify_hashes=False, trusted_keys=trusted_keys)
    except SamfError as e:
        checks.append(("bundle", FAIL, str(e)))
        return None
    bad = [name for name, _, problem in verify_all(b) if problem]
    size = sum(meta["size"] for meta in b.manifest["files"].values())
    if bad:
        checks.append(("bundle", FAIL, f"{', '.join(bad)} do(es) not match the manifest's sha256"))
    else:
        signed = f"; signed by {b.signed_by}" if b.signed_by else ("; signature not checked (no --trusted-key)"
                                                                   if not trusted_keys else "")
        checks.append(("bundle", OK, f"{len(b.manifest['files'])} files, {size / 2**20:.0f} MB, all hashes "
                                     f"match{signed}"))
    return size


def _ports(checks: list, host: str, ports: list) -> None:
    for what, port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                checks.append((f"{what} port", OK, f"{host}:{port} free"))
            except OSError as e:
                checks.append((f"{what} port", FAIL, f"{host}:{port} cannot be bound ({e.strerror or e})"))


def _echo(checks: list, dest: str, calling_ae: str) -> None:
    from samf.errors import SamfError
    from samf.runtime.service.dicom_net import parse_destination

    try:
        ae_title, host, port = parse_destination(dest)
    except SamfError as e:
        checks.append(("dicom-dest", FAIL, str(e)))
        return
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        checks.append(("dicom-dest", FAIL, f"no association with {ae_title} at {host}:{port} (C-ECHO)"))
        return
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if status and status.Status == 0x0000:
        checks.append(("dicom-dest", OK, f"{ae_title} at {host}:{port} answered C-ECHO"))
    else:
        checks.append(("dicom-dest", FAIL, f"{ae_title} at {host}:{port} did not answer C-ECHO with success"))


def run_checks(bundle: str | None = None, trusted_keys=(), dicom_dest: str | None = None,
               host: str = ServiceConfig.host, port: int | None = ServiceConfig.port,
               dicom_port: int | None = ServiceConfig.dicom_port, work: str | None = None,
               calling_ae: str = ServiceConfig.ae_title) -> list:
    """Every check, in order: ``[(name, status, detail)]``; ``work`` (default: the service's) is where the
    service will keep its jobs, the others what ``samf serve`` will be given (default: its defaults)."""
    work = work or default_service_dir()
    checks: list = []
    _cpu(checks)
    _accelerators(checks)
    size = _bundle(checks, bundle, trusted_keys) if bundle else None
    _memory_and_disk(checks, size, work)
    _ports(checks, host, [(w, p) for w, p in (("HTTP", port), ("DICOM", dicom_port)) if p])
    if dicom_dest:
        _echo(checks, dicom_dest, calling_ae)
    return checks
