"""The bundle in a real browser page: ``lcm-run serve`` serves a tiny bundle and the JavaScript runtime's page
(js/demo/), offline; Chromium (Debian's, driven by playwright-core through js/tools/run-page.mjs) opens
``?prompt=…&seed=…&steps=…&autorun=1`` and the canvas must equal the Python runtime's PNG for the same seed, on WASM
(threads: the page is cross-origin isolated) and on WebGPU where Chromium offers an adapter. A ``--target web`` bundle
(weights split over external data files, as a full-size one's are) runs its fp32 variants within 2/255 of Python's PNG
and, on WASM's ``auto``, its INT8 U-Net as close to the fp32 image as the float QDQ reference (the INT8 graph run as
its ops say: docs/design-notes.md, "JavaScript runtime"). A bundle with a changed byte makes the page show an error
naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import lcm_export.targets.web as web_target
from lcm_export.runtime import Pipeline
from tests.helpers import assert_one_line_error, export, image_psnr, run_as_specified

JS = Path(__file__).resolve().parents[2] / "js"
CHROMIUM = Path("/usr/bin/chromium")
PAGE_TIMEOUT = 120  # seconds for the page to load the bundle and generate
QUERY = "?prompt=a%20cat&seed=3&steps=2&autorun=1"
WEB_FILE_BYTES = 300_000  # the tiny model's components are 0.3-6.4 MB: each gets external data files, as at 1.9 GB
PSNR_MARGIN_DB = 1.0  # WASM INT8 against fp32 vs the float QDQ reference against fp32 (js/test/int8.test.js's bound)

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is missing: apt-get install chromium (the browser test needs it)"
)


@pytest.fixture(scope="module", autouse=True)
def js_ready() -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the browser test drives Chromium from Node 20+")
    if not (JS / "node_modules" / "playwright-core").is_dir():
        pytest.skip("js/node_modules has no playwright-core: run `cd js && ONNXRUNTIME_NODE_INSTALL=skip npm ci`")


@contextmanager
def served(bundle: Path) -> Iterator[str]:
    """``lcm-run serve BUNDLE --port 0`` in a subprocess; yields its base URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "lcm_export.runtime.cli", "serve", str(bundle), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert " at http://" in line, (line, process.stderr.read() if process.poll() is not None else "")
        yield line.split(" at ", 1)[1].split()[0]
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()
        process.stderr.close()


def run_page(url: str, *flags: str) -> dict:
    """run-page.mjs on ``url``: the page's status, backend, canvas bytes and last image."""
    result = subprocess.run(
        ["node", "tools/run-page.mjs", url, "--timeout", str(PAGE_TIMEOUT), *flags],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=PAGE_TIMEOUT + 90,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def python_png(tiny_lcm_bundle) -> tuple[np.ndarray, np.ndarray]:
    """The Python runtime's image for the page's query: the floats, and the bytes lcm-run writes as PNG."""
    pipe = Pipeline.load(tiny_lcm_bundle, backend="onnxruntime", precision="fp32")
    result = pipe("a cat", seed=3, num_inference_steps=2)
    image = result.images[0]
    return image, (image * 255).round().astype(np.uint8)  # as cli.save_images


@pytest.fixture(scope="module")
def base_url(tiny_lcm_bundle) -> Iterator[str]:
    with served(tiny_lcm_bundle) as url:
        yield url


def check_image(page: dict, python_png: tuple[np.ndarray, np.ndarray]) -> float:
    """The canvas against the Python PNG (within 2/255) and the floats against Python's; returns the max difference."""
    floats, png = python_png
    assert page["status"] == "done", (page["status"], page["logs"])
    assert (page["height"], page["width"]) == png.shape[:2]
    canvas = np.array(page["canvas"], dtype=np.int16).reshape(page["height"], page["width"], 4)
    assert (canvas[..., 3] == 255).all()
    difference = int(np.abs(canvas[..., :3] - png).max())
    print(f"{page['backend']}: canvas vs Python PNG max {difference}/255 in {page['seconds']:.1f}s")
    assert difference <= 2
    last = page["lastImage"]
    assert (last["height"], last["width"]) == floats.shape[:2]
    assert np.abs(np.array(last["data"], dtype=np.float32).reshape(floats.shape) - floats).max() <= 2 / 255
    assert page["external"] == [], "the page fetched from outside the server"
    assert "vae_decode" in page["timings"] and "total" in page["timings"]
    return difference


def test_wasm_page_equals_python(base_url, python_png):
    page = run_page(f"{base_url}{QUERY}&backend=wasm")
    assert page["backend"] == "wasm"
    assert page["crossOriginIsolated"] is True  # COOP/COEP from the server: WASM on threads
    check_image(page, python_png)


def test_auto_without_adapter_runs_wasm(base_url, python_png):
    page = run_page(f"{base_url}{QUERY}")  # --disable-gpu: no WebGPU adapter, so "auto" is WASM
    assert page["backend"] == "wasm"
    check_image(page, python_png)


@pytest.mark.slow
def test_webgpu_page_equals_python(base_url, python_png):
    page = run_page(f"{base_url}{QUERY}&backend=webgpu", "--webgpu")
    if "skip" in page:
        print(page["skip"])
        pytest.skip(page["skip"])
    assert page["backend"] == "webgpu"
    assert page["crossOriginIsolated"] is True
    check_image(page, python_png)


def test_changed_byte_shows_error_naming_the_file(tiny_lcm_bundle, tmp_path):
    broken = shutil.copytree(tiny_lcm_bundle, tmp_path / "broken")
    model = broken / "unet" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: the server's size check passes, the page's sha256 does not
    model.write_bytes(bytes(data))
    with served(broken) as url:
        page = run_page(f"{url}{QUERY}&backend=wasm")
    assert page["status"].startswith("error: "), page["status"]
    assert "unet/model.onnx" in page["status"]
    assert page["shown"] == page["status"]  # the page shows it
    assert page["lastImage"] is None


def test_manifest_broken_while_served_shows_error_naming_the_field(tiny_lcm_bundle, tmp_path):
    bundle = shutil.copytree(tiny_lcm_bundle, tmp_path / "changed")
    with served(bundle) as url:  # valid when the server starts; the page reads manifest.json itself
        path = bundle / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["components"]["unet"]["variants"][0]["io_dtype"] = "float64"
        path.write_text(json.dumps(manifest))
        page = run_page(f"{url}{QUERY}&backend=wasm")
    assert page["status"].startswith("error: "), page["status"]
    assert "components.unet.variants[0].io_dtype" in page["status"]


def test_serve_rejects_a_broken_manifest(tiny_lcm_bundle, tmp_path):
    broken = shutil.copytree(tiny_lcm_bundle, tmp_path / "bad-manifest")
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["format_version"] = 99
    (broken / "manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run(
        [sys.executable, "-m", "lcm_export.runtime.cli", "serve", str(broken), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_one_line_error(result, "manifest format version 99")


def test_serve_serves_only_its_folders(base_url):
    from urllib.error import HTTPError
    from urllib.request import urlopen

    with urlopen(f"{base_url}bundle/manifest.json") as response:
        assert response.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        assert response.headers["Cross-Origin-Opener-Policy"] == "same-origin"
    with urlopen(f"{base_url}node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.jsep.wasm") as response:
        assert response.headers["Content-Type"] == "application/wasm"
    with urlopen(f"{base_url}src/index.js") as response:
        assert response.headers["Content-Type"].startswith("text/javascript")
    for path in ("bundle/../../etc/passwd", "bundle/%2e%2e/manifest.json", "bundle/", "node_modules/ajv/package.json"):
        with pytest.raises(HTTPError) as error:
            urlopen(f"{base_url}{path}")
        assert error.value.code == 404, path


@pytest.fixture(scope="module")
def web_int8_bundle(tiny_lcm_dir, tmp_path_factory) -> Path:
    """``--target web --precision int8``: fp32, fp16 and INT8 U-Net variants, weights in external data files."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(web_target, "TARGET", dataclasses.replace(web_target.TARGET, max_file_bytes=WEB_FILE_BYTES))
        output = tmp_path_factory.mktemp("web") / "int8"
        options = {"target": "web", "precision": "int8", "calibration_size": 2, "calibration_resolution": 32}
        return export(tiny_lcm_dir, output, **options)


@pytest.fixture(scope="module")
def web_images(web_int8_bundle) -> dict[str, np.ndarray]:
    """The Python runtime on the web bundle, the page's query: fp32 variants, and the INT8 U-Net run as specified."""
    fp32 = Pipeline.load(web_int8_bundle, backend="onnxruntime", variant="fp32", precision="fp32")
    assert {choice.precision for choice in fp32.variants.values()} == {"fp32"}
    int8 = Pipeline.load(web_int8_bundle, backend="onnxruntime", variant="int8", precision="fp32")
    assert int8.variants["unet"].precision == "int8"
    reference = run_as_specified(int8, web_int8_bundle, components=("unet",))
    return {
        "fp32": fp32("a cat", seed=3, num_inference_steps=2).images[0],
        "int8_reference": reference("a cat", seed=3, num_inference_steps=2).images[0],
    }


def test_web_bundle_fp32_page_equals_python(web_int8_bundle, web_images):
    manifest = json.loads((web_int8_bundle / "manifest.json").read_text())
    split = [entry["path"] for entry in manifest["files"] if "onnx_data_" in entry["path"]]
    assert split, "the web bundle's weights are not split over several external data files"
    with served(web_int8_bundle) as url:
        page = run_page(f"{url}{QUERY}&backend=wasm&precision=fp32")
    assert page["variants"] == {"text_encoder": "fp32", "unet": "fp32", "vae_decoder": "fp32"}
    floats = web_images["fp32"]
    check_image(page, (floats, (floats * 255).round().astype(np.uint8)))


def test_web_bundle_int8_page_is_as_close_to_fp32_as_the_qdq_reference(web_int8_bundle, web_images):
    with served(web_int8_bundle) as url:
        page = run_page(f"{url}{QUERY}&backend=wasm")  # auto: backend_variants' wasm list, INT8 first
    assert page["status"] == "done", (page["status"], page["logs"])
    assert page["variants"]["unet"] == "int8" and page["crossOriginIsolated"] is True
    # The page fetches (and hashes) the files of the variants it opens, not the bundle's other U-Nets.
    unet_files = sorted(path.rsplit("/", 1)[1] for path in page["fetched"] if path.startswith("/bundle/unet/"))
    assert unet_files and all(name.startswith("model-int8.onnx") for name in unet_files), unet_files
    fp32, reference = web_images["fp32"], web_images["int8_reference"]
    canvas = np.array(page["canvas"], dtype=np.float32).reshape(page["height"], page["width"], 4)[..., :3] / 255
    page_psnr = image_psnr(canvas, fp32)
    reference_psnr = image_psnr((reference * 255).round() / 255, fp32)
    apart = float(np.abs(canvas - reference).max())
    print(f"INT8 page vs fp32 {page_psnr:.2f} dB, QDQ reference vs fp32 {reference_psnr:.2f} dB, apart {apart:.3f}")
    assert abs(page_psnr - reference_psnr) <= PSNR_MARGIN_DB
