"""Bundle verification hashes only what a start loads, remembers what it found intact, and catches edits."""

import hashlib
import json
import os
import shutil

import pytest
from cli_runner import invoke_cli, run_cli

from samf.errors import BundleError
from samf.runtime.bundle import bundle as B

FILES = ("vit.onnx", "aggregator.onnx", "fusion.onnx", "llm-F32.gguf", "llm-Q8_0.gguf")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "samf" / "verified.json"


@pytest.fixture()
def bundle(tmp_path):
    """A bundle's layout with stand-in bytes: reading checks manifests and hashes, not what the files hold."""
    root = tmp_path / "bundle"
    root.mkdir()
    files = {}
    for i, name in enumerate(FILES):
        data = os.urandom(1000 + 97 * i)
        (root / name).write_bytes(data)
        files[name] = dict(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (root / B.MANIFEST).write_text(json.dumps(stand_in_manifest(files)))
    return root


def stand_in_manifest(files: dict) -> dict:
    """The smallest manifest a bundle may have: the tiny preset's shapes, two GGUFs, sealed."""
    from samf.runtime.bundle.manifest import seal

    image = dict(vit=dict(img_size=48, in_chans=3), aggregator=dict(n_slices=18, n_tokens=8), fusion=dict(d_llm=128))
    return seal(dict(
        schema=B.SCHEMA_VERSION, files=files, engines={},
        model=dict(image=image, image_tokens=8, llm=dict(hidden_size=128)),
        preprocess=dict(image_size=48, pixel_spacing_mm=8.0, slices_per_plane=6, windows=[[-600, 1500], [40, 400],
                                                                                           [400, 1800]]),
        prompt=dict(layout=dict(answer_end=2)),
        llm=dict(default="Q8_0", files={"F32": "llm-F32.gguf", "Q8_0": "llm-Q8_0.gguf"}),
        encoders=dict(fp32=dict(files=dict(vit="vit.onnx", aggregator="aggregator.onnx", fusion="fusion.onnx")))))


@pytest.fixture()
def hashed(monkeypatch):
    """The names of the files hashed."""
    calls, real = [], B.hash_fd
    monkeypatch.setattr(B, "hash_fd", lambda fd, *a, **k: calls.append(
        os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))) or real(fd, *a, **k))
    return calls


def test_only_the_loaded_artifacts_are_hashed(bundle, cache, hashed):
    B.read_bundle(str(bundle), quant="F32")
    assert sorted(hashed) == sorted(["vit.onnx", "aggregator.onnx", "fusion.onnx", "llm-F32.gguf"])


def test_second_open_does_not_hash(bundle, cache, hashed):
    B.read_bundle(str(bundle))
    assert len(hashed) == 4 and cache.exists()
    hashed.clear()
    b = B.read_bundle(str(bundle))
    assert hashed == []
    b.verify(["llm-F32.gguf"])  # another quant: hashed once, then remembered too
    B.read_bundle(str(bundle), quant="F32")
    assert hashed == ["llm-F32.gguf"]


def write_same_size(path, restore_mtime: bool) -> None:
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    if restore_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(path) == st.st_size


@pytest.mark.parametrize("restore_mtime", [False, True])
def test_a_file_changed_after_verification_is_caught(bundle, cache, restore_mtime):
    B.read_bundle(str(bundle))
    write_same_size(bundle / "vit.onnx", restore_mtime)  # os.utime puts mtime back but sets ctime: still caught
    with pytest.raises(BundleError, match="vit.onnx does not match its sha256"):
        B.read_bundle(str(bundle))
    with pytest.raises(BundleError, match="vit.onnx"):  # and not remembered as good
        B.read_bundle(str(bundle))


def test_an_unwritable_cache_only_costs_hashing(bundle, tmp_path, monkeypatch, hashed):
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-dir"))
    B.read_bundle(str(bundle))
    B.read_bundle(str(bundle))
    assert len(hashed) == 8


def test_a_corrupt_cache_is_ignored(bundle, cache, hashed):
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    B.read_bundle(str(bundle))
    assert len(hashed) == 4 and json.loads(cache.read_text())["version"] == 1


def test_verify_command_rehashes_everything(bundle, cache):
    B.read_bundle(str(bundle))  # the cache knows four files; verify must hash all five anyway
    proc = run_cli("samf-export", "verify", str(bundle))
    assert proc.returncode == 0, proc.stderr
    assert all(f"ok      {name}" in proc.stdout for name in FILES), proc.stdout
    assert "all 5 files match" in proc.stdout


def test_verify_command_names_what_changed(bundle, cache):
    B.read_bundle(str(bundle))
    write_same_size(bundle / "llm-F32.gguf", restore_mtime=True)
    write_same_size(bundle / "vit.onnx", restore_mtime=False)
    proc = invoke_cli("samf-export", "verify", str(bundle))  # in-process: the message and the exit code
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "2 of 5" in lines[0] and "llm-F32.gguf" in lines[0] and "vit.onnx" in lines[0]
    assert "ALTERED llm-F32.gguf" in proc.stdout


def test_verify_command_on_a_folder_that_is_not_a_bundle(tmp_path):
    proc = invoke_cli("samf-export", "verify", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "not a samf bundle" in proc.stderr


# ------------------------------------------------------------------------ a hostile manifest (issue 11)

def _edit(bundle, change, reseal=True):
    from samf.runtime.bundle.manifest import seal

    path = bundle / B.MANIFEST
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(seal(m) if reseal else m))


def _refused(bundle, *words):
    with pytest.raises(BundleError) as e:
        B.read_bundle(str(bundle))
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_an_edit_to_the_manifest_is_caught_like_an_edit_to_an_artifact(bundle, cache):
    B.read_bundle(str(bundle))
    _edit(bundle, lambda m: m["preprocess"].update(pixel_spacing_mm=2.0), reseal=False)  # changes every report
    _refused(bundle, "manifest.json was changed after export")


@pytest.mark.parametrize("change,words", [
    (lambda m: m["files"].update({"../outside.gguf": m["files"].pop("llm-Q8_0.gguf")}), ("files",)),
    (lambda m: m["llm"]["files"].update(Q8_0="/etc/passwd"), ("llm/files/Q8_0",)),
    (lambda m: m["llm"]["files"].update(Q8_0="sub/llm.gguf"), ("llm/files/Q8_0",)),
    (lambda m: m.pop("preprocess"), ("'preprocess' is a required property",)),
    (lambda m: m["preprocess"].update(gamma=2.2), ("preprocess", "gamma")),
    (lambda m: m["preprocess"].update(image_size="big"), ("preprocess/image_size",)),
    (lambda m: m["prompt"]["layout"].update(stop=[-1]), ("prompt/layout/stop",)),
    (lambda m: m["preprocess"].update(image_size=64), ("does not fit together", "64² slices")),
    (lambda m: m["model"]["llm"].update(hidden_size=3072), ("does not fit together", "3072 wide")),
    (lambda m: m["preprocess"].update(slices_per_plane=8), ("does not fit together", "24 slices")),
])
def test_a_malformed_or_inconsistent_manifest_is_one_line(bundle, cache, change, words):
    _edit(bundle, change)
    _refused(bundle, *words)


@pytest.mark.parametrize("content", [[], None, "text", 3])
def test_a_manifest_that_is_not_an_object(bundle, content):
    (bundle / B.MANIFEST).write_text(json.dumps(content))
    _refused(bundle, "not an object" if content is not None else "NoneType")


def test_a_manifest_or_artifact_that_is_not_a_regular_file(bundle, tmp_path):
    (bundle / B.MANIFEST).unlink()
    os.mkfifo(bundle / B.MANIFEST)  # reading would wait forever
    _refused(bundle, "not a manifest")
    (bundle / B.MANIFEST).unlink()
    os.symlink("/dev/zero", bundle / B.MANIFEST)  # reading would never end
    _refused(bundle, "not a manifest")


def test_an_artifact_swapped_for_a_link_to_elsewhere_is_refused(bundle, cache, tmp_path):
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes((bundle / "llm-Q8_0.gguf").read_bytes())
    (bundle / "llm-Q8_0.gguf").unlink()
    os.symlink(outside, bundle / "llm-Q8_0.gguf")
    _refused(bundle, "llm-Q8_0.gguf is not a regular file")


def test_what_is_loaded_is_what_was_verified_even_if_the_path_is_swapped_after(bundle, cache):
    b = B.read_bundle(str(bundle), verify_hashes=False)
    art = b.open("llm-Q8_0.gguf")                       # verified through this descriptor
    onnx = b.open("vit.onnx")
    good, good_onnx = (bundle / "llm-Q8_0.gguf").read_bytes(), (bundle / "vit.onnx").read_bytes()
    for name in ("llm-Q8_0.gguf", "vit.onnx"):          # an attacker replaces both files after the check
        (bundle / f"{name}.evil").write_bytes(os.urandom(len(good)))
        os.replace(bundle / f"{name}.evil", bundle / name)
    assert open(art.path, "rb").read() == good and open(onnx.path, "rb").read() == good_onnx
    assert art.path.startswith("/proc/self/fd/")
    art.close(), onnx.close()
    with pytest.raises(BundleError, match="llm-Q8_0.gguf does not match"):
        b.open("llm-Q8_0.gguf")                         # the next open checks the new file


def test_a_manifest_nested_too_deep_to_parse(bundle):
    (bundle / B.MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    _refused(bundle, "unreadable manifest")


def test_the_pipeline_frees_what_it_opened_even_when_loading_fails(quick, tmp_path):
    """A context manager: after it, and after a load that fails half-way (an altered LLM, found once the
    encoders are open), no descriptor of the bundle is left open."""
    import gc

    from samf.errors import BundleError
    from samf.runtime.inference.pipeline import ReportPipeline

    def open_in(folder):
        gc.collect()
        return sorted(t for t in (os.path.realpath(f"/proc/self/fd/{n}") for n in os.listdir("/proc/self/fd"))
                      if t.startswith(str(folder)))

    b = tmp_path / "b"
    shutil.copytree(quick.bundle, b)
    with ReportPipeline(str(b)) as pipe:
        assert open_in(b)  # the artifacts stay open while the engines use them
    assert open_in(b) == []
    pipe.close()  # twice is fine
    llm = b / json.loads((b / "manifest.json").read_text())["llm"]["files"]["Q8_0"]
    raw = bytearray(llm.read_bytes())
    raw[len(raw) // 2] ^= 1
    llm.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="sha256"):
        ReportPipeline(str(b), quant="Q8_0")
    assert open_in(b) == []
