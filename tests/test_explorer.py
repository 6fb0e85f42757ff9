"""The explorer page (explorer.html) in a real browser, headless Chromium through selenium, and the
architecture figure (architecture.png). The browser tests skip, saying why, where selenium,
/usr/bin/chromium or /usr/bin/chromedriver is missing; everything else runs anyway.

`python tests/test_explorer.py PAGE.html OUT.png` opens a page in headless Chromium (1400 x 900),
points at the VAE's plane, prints how long a decode takes there, and saves a screenshot (the
README's figures/explorer.png)."""
import base64
import json
import os
import re
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the project's modules are one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
import torch
from matplotlib.text import Text

import main
import metrics
import plots
import utils
from conftest import FAST_SCORES, make_synthetic_mnist
from models import VAE, ModelConfig, build_model

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:"
ONE_LEVEL = 1 / 255  # what the page's 8-bit images can show
PAGES = {  # name: (models, latent size, architecture, condition)
    "both": (("vae", "ae"), 3, "mlp", "none"), "vae, 2-D": (("vae",), 2, "mlp", "none"),
    "ae, 1-D": (("ae",), 1, "mlp", "none"), "conv": (("vae", "ae"), 3, "conv", "none"),
    "conditional": (("vae", "ae"), 3, "mlp", "label"),
}


# ------------------------------------------------------------------ tiny pages and a browser

def tiny_models(kinds, latent_dim, arch, condition, images, labels):
    """{"VAE": model, ...} and their configs: 2 hidden layers of 16, three Adam steps on `images`."""
    trained, configs = {}, {}
    with torch.random.fork_rng():  # the weights' draws leave the other tests' global RNG alone
        torch.manual_seed(0)
        for kind in kinds:
            config = ModelConfig(kind=kind, latent_dim=latent_dim, hidden_dim=16, arch=arch, hidden_layers=2,
                                 condition=condition)
            model = build_model(config)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            for _ in range(3):
                loss, _ = model(images, labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            trained[kind.upper()], configs[kind.upper()] = model.eval(), config
    return trained, configs


def write_tiny_page(path, kinds, latent_dim, arch, condition):
    """explorer.html of a tiny pair, written as draw_figures writes it; returns the models."""
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.rand(64, 784, generator=generator), torch.arange(64) % 10
    trained, configs = tiny_models(kinds, latent_dim, arch, condition, images[:16], labels[:16])  # conv: 0.1 s a step
    codes = {name: metrics.codes_of(model, images, labels) for name, model in trained.items()}
    scores = {"vae": {"posterior": {"posterior_mean_variance": codes["VAE"].var(dim=0).tolist()}}} \
        if "VAE" in codes else {}
    axes = {name: plots.principal_axes(model_codes) for name, model_codes in codes.items()}
    plots.write_explorer(trained, configs, codes, axes, metrics.make_samplers(trained, (images, labels)), scores,
                         (images, labels), utils.DATASETS["mnist"], path)
    return trained


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """{name: (path, models)} for each of PAGES."""
    folder = tmp_path_factory.mktemp("explorer")
    return {name: (folder / f"{index}.html", write_tiny_page(folder / f"{index}.html", *spec))
            for index, (name, spec) in enumerate(PAGES.items())}


def browser_missing():
    """Why headless Chromium cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements.txt)"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


def start_chromium(*, width=1400, height=900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", f"--window-size={width},{height + 200}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages, to check
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {  # the page's own size, exactly
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    return driver


@pytest.fixture(scope="module")
def browser():
    reason = browser_missing()
    if reason:
        pytest.skip(f"the explorer page's browser tests need headless Chromium: {reason}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SE_AVOID_STATS", "true")  # before selenium starts: it sends no usage statistics
        driver = start_chromium()
        yield driver
        driver.quit()


def open_page(driver, path):
    driver.get(Path(path).resolve().as_uri())
    assert driver.execute_script("return Boolean(window.explorer)"), console_errors(driver)


def console_errors(driver):
    """The SEVERE messages of the console since it was last read (reading it empties it)."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def canvas_image(driver, element_id):
    return driver.execute_script(f"return document.getElementById({element_id!r}).toDataURL()")


def torch_images(model, z, label=None):
    with torch.no_grad():
        return torch.sigmoid(model.decode(torch.tensor(z, dtype=torch.float32), label)).double().numpy()


def page_decodes(driver, name, z, label=None):
    return np.array(driver.execute_script(
        "return arguments[0].map(z => window.explorer.decode(arguments[1], z, arguments[2]))", z, name, label))


def probe_codes(latent_dim, count=24):
    """Codes where the page must decode like torch: the prior's, three times as wide, and far out."""
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(count, latent_dim, generator=generator)
    return (z * torch.tensor([1.0, 3.0, 10.0]).repeat_interleave(count // 3)[:, None]).tolist()


# ------------------------------------------------------------------ the page in the browser

@pytest.mark.parametrize("name", ["both", "vae, 2-D", "ae, 1-D"])
def test_the_page_decodes_like_torch(browser, pages, name):
    path, trained = pages[name]
    open_page(browser, path)
    for model_name, model in trained.items():
        assert browser.execute_script("return window.explorer.live(arguments[0])", model_name)
        z = probe_codes(model.latent_dim)
        decoded = page_decodes(browser, model_name, z)
        assert decoded.shape == (len(z), 784) and decoded.min() >= 0 and decoded.max() <= 1
        assert np.abs(decoded - torch_images(model, z)).max() < ONE_LEVEL, model_name
    assert not console_errors(browser)


def test_a_conditional_page_decodes_like_torch_with_the_label_asked_for_and_its_picker(browser, pages):
    path, trained = pages["conditional"]
    open_page(browser, path)
    z = probe_codes(3, count=6)
    for name, model in trained.items():
        assert browser.execute_script("return window.explorer.conditional(arguments[0])", name)
        for label in (0, 7):
            assert np.abs(page_decodes(browser, name, z, label) - torch_images(model, z, label)).max() < ONE_LEVEL
    before = {name: canvas_image(browser, f"decode-{name}") for name in trained}
    browser.find_element("id", "label-7").click()
    assert browser.execute_script("return window.explorer.label()") == 7
    assert all(canvas_image(browser, f"decode-{name}") != before[name] for name in trained)
    assert np.abs(page_decodes(browser, "VAE", z) - torch_images(trained["VAE"], z, 7)).max() < ONE_LEVEL
    open_page(browser, pages["both"][0])  # an unconditional page: no picker, the label ignored
    assert not browser.find_element("id", "label-picker").is_displayed()
    assert not console_errors(browser)


def torch_codes(model, pixels, label=None):
    with torch.no_grad():
        out = model.encoder(model.with_label(torch.tensor(pixels, dtype=torch.float32), label)).double().numpy()
    return {"mu": out[:, :model.latent_dim], "logvar": out[:, model.latent_dim:]} if isinstance(model, VAE) \
        else {"mu": out}


@pytest.mark.parametrize("name", ["both", "conditional"])
def test_the_page_encodes_like_torch(browser, pages, name):
    path, trained = pages[name]
    open_page(browser, path)
    pixels = torch.rand(6, 784, generator=torch.Generator().manual_seed(3)).tolist()
    label = 4 if name == "conditional" else None
    for model_name, model in trained.items():
        got = browser.execute_script("return arguments[0].map(p => window.explorer.encode(arguments[1], p, arguments[2]))",
                                     pixels, model_name, label)
        expected = torch_codes(model, pixels, label)
        assert set(got[0]) == set(expected), model_name  # the VAE's {mu, logvar}, the AE's {mu}
        for key, values in expected.items():
            assert np.abs(np.array([code[key] for code in got]) - values).max() < 1e-3, (model_name, key)
    assert not console_errors(browser)


def draw_stroke(driver, points):
    """A stroke of pointer events on the drawing pad, through `points` (x, y) in its 224 x 224 pixels."""
    from selenium.webdriver.common.action_chains import ActionChains

    pad = driver.find_element("id", "drawing-pad")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", pad)  # a pointer reaches only what is seen
    x, y = points[0]
    actions = ActionChains(driver).move_to_element_with_offset(pad, x - 112, y - 112).click_and_hold()
    for next_x, next_y in points[1:]:
        actions = actions.move_by_offset(next_x - x, next_y - y)
        x, y = next_x, next_y
    actions.release().perform()


SEVEN = [(60, 50), (170, 50), (150, 100), (120, 160), (105, 195)]  # a 7, in the pad's pixels


def test_a_drawn_digit_is_encoded_by_both_models_and_shown_on_both_planes(browser, pages):
    open_page(browser, pages["both"][0])
    planes = {name: browser.execute_script(
        f"return document.querySelector('canvas.plane[data-model=\"{name}\"]').toDataURL()") for name in ("VAE", "AE")}
    blank = canvas_image(browser, "drawn-VAE")
    draw_stroke(browser, SEVEN)
    drawing, codes = browser.execute_script("return [window.explorer.drawing(), window.explorer.drawnCodes()]")
    pixels = np.array(drawing).reshape(28, 28)
    rows, columns = np.nonzero(pixels > 0.05)
    assert 0 < pixels.max() <= 1 and max(np.ptp(rows), np.ptp(columns)) <= 20  # scaled into 20 x 20, as MNIST
    mass = pixels.sum()
    assert abs((pixels.sum(1) * np.arange(28)).sum() / mass - 14) <= 1  # centred by its mass
    assert abs((pixels.sum(0) * np.arange(28)).sum() / mass - 14) <= 1
    assert set(codes) == {"VAE", "AE"} and set(codes["VAE"]) == {"mu", "logvar"} and set(codes["AE"]) == {"mu"}
    for name, model in pages["both"][1].items():
        assert np.abs(np.array(codes[name]["mu"]) - torch_codes(model, [drawing])["mu"][0]).max() < 1e-3
        assert canvas_image(browser, f"drawn-{name}") != blank
        assert browser.execute_script(
            f"return document.querySelector('canvas.plane[data-model=\"{name}\"]').toDataURL()") != planes[name]
    browser.find_element("id", "clear-drawing").click()
    assert browser.execute_script("return window.explorer.drawnCodes()") is None
    assert not console_errors(browser)


def test_a_selected_dot_shows_its_posterior_and_a_click_on_empty_plane_pins_the_cursor(browser, pages):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    open_page(browser, pages["both"][0])
    plane = browser.find_element("css selector", 'canvas.plane[data-model="VAE"]')
    before = browser.execute_script("return arguments[0].toDataURL()", plane)
    x, y = browser.execute_script("return window.explorer.dotPixel('VAE', 9)")
    ActionChains(browser).move_to_element_with_offset(plane, round(x - 190), round(y - 190)).click().perform()
    index = browser.execute_script("return window.explorer.selected()")
    posterior = browser.execute_script("return window.explorer.posterior('VAE')")
    assert index != 0 and posterior["sd"][0] >= posterior["sd"][1] > 0  # the ellipses' half axes, in sd
    assert browser.execute_script("return window.explorer.posterior('AE')") is None  # the AE: one code
    assert browser.execute_script("return arguments[0].toDataURL()", plane) != before
    draws = canvas_image(browser, "posterior-draw-0")
    browser.find_element("id", "redraw").click()
    assert canvas_image(browser, "posterior-draw-0") != draws
    ActionChains(browser).move_to_element_with_offset(plane, -185, -185).click().perform()  # a corner: no dot
    pinned = browser.execute_script("return window.explorer.cursor()")
    assert browser.execute_script("return window.explorer.pinned()") and "pinned" in browser.find_element(
        "id", "pinned-VAE").text
    ActionChains(browser).move_to_element_with_offset(plane, 60, 60).perform()
    assert browser.execute_script("return window.explorer.cursor()") == pinned  # it stays where it was pinned
    plane.send_keys(Keys.ARROW_RIGHT)
    assert browser.execute_script("return window.explorer.cursor()")["u"] > pinned["u"]
    plane.send_keys(Keys.ESCAPE)
    assert not browser.execute_script("return window.explorer.pinned()")
    assert not console_errors(browser)


def test_a_conv_page_decodes_the_nearest_grid_point_and_says_so(browser, pages):
    path, trained = pages["conv"]
    open_page(browser, path)
    data = page_data(path)
    for spec in data["models"]:
        name, limit, side = spec["name"], spec["limit"], spec["grid"]["side"]
        assert not browser.execute_script("return window.explorer.live(arguments[0])", name)
        u, v = -limit + 2 * limit * 3 / (side - 1), limit - 2 * limit * 5 / (side - 1)  # a grid point
        z = [browser.execute_script("return window.explorer.planePoint(arguments[0], arguments[1], arguments[2])",
                                    name, u, v)]
        assert np.abs(page_decodes(browser, name, z) - torch_images(trained[name], z)).max() <= ONE_LEVEL
        note = browser.find_element("css selector", f"#card-{name} .note").text
        assert "convolutional" in note and f"{side} x {side} grid" in note
    assert "Drawing needs the MLP" in browser.find_element("id", "drawing-sub").text
    assert not console_errors(browser)


def test_pointing_at_a_plane_decodes_there_and_the_other_model_follows(browser, pages):
    from selenium.webdriver.common.action_chains import ActionChains

    open_page(browser, pages["both"][0])
    before = {name: canvas_image(browser, f"decode-{name}") for name in ("VAE", "AE")}
    plane = browser.find_element("css selector", 'canvas.plane[data-model="VAE"]')
    ActionChains(browser).move_to_element_with_offset(plane, 70, -60).perform()
    cursor = browser.execute_script("return window.explorer.cursor()")
    assert cursor["name"] == "VAE" and cursor["u"] > 0 and cursor["v"] > 0
    for name in ("VAE", "AE"):
        assert canvas_image(browser, f"decode-{name}") != before[name], name
    assert "linked cursor" in browser.find_element("css selector", "#card-AE .caption").text
    # what the pointer shows is the decode of z = m_perp + u a1 + v a2
    z = browser.execute_script("return window.explorer.planePoint('AE', arguments[0], arguments[1])",
                               cursor["u"], cursor["v"])
    shown = browser.execute_script("""const canvas = document.getElementById('decode-AE');
        return Array.from(canvas.getContext('2d').getImageData(0, 0, 28, 28).data).filter((_, i) => i % 4 === 0);""")
    expected = np.round(255 * torch_images(pages["both"][1]["AE"], [z])[0])
    assert np.abs(np.array(shown) - expected).max() <= 1
    assert not console_errors(browser)


def test_the_sample_button_draws_new_samples(browser, pages):
    open_page(browser, pages["both"][0])
    rows = browser.execute_script("return document.querySelectorAll('#sample-rows > div').length")
    assert rows == 3  # VAE and AE from N(0, I), and the AE's fitted Gaussian
    before = [canvas_image(browser, f"sample-{row}-0") for row in range(rows)]
    browser.find_element("id", "sample").click()
    assert all(canvas_image(browser, f"sample-{row}-0") != before[row] for row in range(rows))
    assert not console_errors(browser)


def test_interpolation_between_clicked_dots_random_pairs_and_the_slider(browser, pages):
    from selenium.webdriver.common.action_chains import ActionChains

    open_page(browser, pages["both"][0])
    plane = browser.find_element("css selector", 'canvas.plane[data-model="AE"]')
    for index in (5, 12):  # click two dots: the ends A and B
        x, y = browser.execute_script("return window.explorer.dotPixel('AE', arguments[0])", index)
        ActionChains(browser).move_to_element_with_offset(
            plane, round(x - plane.size["width"] / 2), round(y - plane.size["height"] / 2)).click().perform()
    pair = browser.execute_script("return window.explorer.pair()")
    assert len(pair) == 2 and pair[0] != pair[1]  # dots at those places (another may lie on top)
    ends = [canvas_image(browser, "end-A"), canvas_image(browser, "end-B")]
    path_images = {name: canvas_image(browser, f"path-{name}") for name in ("VAE", "AE")}
    browser.find_element("id", "random-pair").click()
    assert browser.execute_script("return window.explorer.pair()") != pair
    assert [canvas_image(browser, "end-A"), canvas_image(browser, "end-B")] != ends
    moved = {name: canvas_image(browser, f"path-{name}") for name in ("VAE", "AE")}
    slider = browser.find_element("id", "t-slider")
    ActionChains(browser).move_to_element_with_offset(slider, round(slider.size["width"] * 0.4), 0).click().perform()
    assert float(browser.find_element("id", "t-value").text) > 0.8
    assert all(canvas_image(browser, f"path-{name}") != moved[name] for name in ("VAE", "AE"))
    assert path_images != moved
    assert not console_errors(browser)


def test_the_vae_sliders_move_its_most_active_dimensions(browser, pages):
    from selenium.webdriver.common.action_chains import ActionChains

    open_page(browser, pages["both"][0])
    sliders = browser.find_elements("css selector", "#dims-sliders input")
    assert len(sliders) == 3  # min(4, latent size 3)
    before = canvas_image(browser, "dims-decode")
    ActionChains(browser).move_to_element_with_offset(sliders[0], round(sliders[0].size["width"] * 0.45), 0) \
        .click().perform()
    assert canvas_image(browser, "dims-decode") != before
    open_page(browser, pages["ae, 1-D"][0])  # no VAE: no sliders
    assert not browser.find_element("id", "dims-card").is_displayed()
    assert not console_errors(browser)


@pytest.mark.parametrize("name", list(PAGES))
def test_the_page_loads_nothing_and_logs_no_error(browser, pages, name):
    path, trained = pages[name]
    text = path.read_text()
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in text
    assert not re.search(r"https?://|<link rel=\"stylesheet|<script src", text)
    open_page(browser, path)
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert browser.execute_script("return window.explorer.models") == list(trained)
    assert len(browser.find_elements("css selector", "canvas.plane")) == len(trained)
    assert not console_errors(browser)


def test_a_decode_takes_at_most_a_few_milliseconds(browser, pages):
    open_page(browser, pages["both"][0])
    for name in ("VAE", "AE"):
        median, mean = decode_milliseconds(browser, name)
        assert median < 10 and mean < 10, (name, median, mean)


def decode_milliseconds(driver, name, count=200):
    """(median of `count` decodes, each timed; their mean, timed as one block) in ms. Chromium
    rounds performance.now() to 0.1 ms here, hence the mean too."""
    return driver.execute_script("""
        const name = arguments[0], count = arguments[1], dim = window.explorer.latentDim(name), times = [];
        const z = Array.from({length: dim}, (_, k) => Math.sin(k));
        for (let k = 0; k < 20; k++) window.explorer.decode(name, z);  // compiled first
        for (let k = 0; k < count; k++) {
            z[0] = Math.cos(k);
            const start = performance.now();
            window.explorer.decode(name, z);
            times.push(performance.now() - start);
        }
        const start = performance.now();
        for (let k = 0; k < count; k++) { z[0] = Math.cos(k); window.explorer.decode(name, z); }
        const mean = (performance.now() - start) / count;
        times.sort((a, b) => a - b);
        return [times[Math.floor(count / 2)], mean];""", name, count)


# ------------------------------------------------------------------ the page without a browser

def page_data(path):
    """The JSON the page carries, parsed."""
    found = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', Path(path).read_text(),
                      re.S)
    return json.loads(found.group(1))


def numpy_decode(spec, z):
    """What the page's JavaScript computes, in NumPy: its embedded layers, in float64."""
    x = np.array(z, dtype=np.float64)
    for layer in spec["layers"]:
        weight = np.frombuffer(base64.b64decode(layer["weight"]), dtype="<f2" if layer["dtype"] == "float16" else "<f4")
        bias = np.frombuffer(base64.b64decode(layer["bias"]), dtype="<f4")
        x = x @ weight.astype(np.float64).reshape(layer["in"], layer["out"]) + bias
        x = np.maximum(x, 0) if layer["relu"] else x
    return 1 / (1 + np.exp(-x))


def test_the_embedded_weights_decode_like_torch(pages):
    path, trained = pages["both"]
    data = page_data(path)
    assert [spec["name"] for spec in data["models"]] == ["VAE", "AE"]
    for spec in data["models"]:
        assert [layer["dtype"] for layer in spec["layers"]] == ["float32", "float16", "float16"]
        z = probe_codes(spec["latentDim"])
        assert np.abs(numpy_decode(spec, z) - torch_images(trained[spec["name"]], z)).max() < ONE_LEVEL
    vae = data["models"][0]
    m_perp, (a1, a2) = np.array(vae["mPerp"]), np.array(vae["axes"])
    assert abs(m_perp @ a1) < 1e-6 and abs(m_perp @ a2) < 1e-6  # the plane's offset: the mean off its axes
    assert np.allclose(m_perp + (np.array(vae["mean"]) @ a1) * a1 + (np.array(vae["mean"]) @ a2) * a2, vae["mean"],
                       atol=1e-6)


def test_a_run_writes_the_page_and_the_architecture_beside_the_figures_and_eval_rewrites_them(tmp_path):
    data_dir = make_synthetic_mnist(tmp_path / "mnist")
    figures = tmp_path / "run" / "figures"
    run_flags = ["--data-dir", str(data_dir), "--checkpoint-dir", str(tmp_path / "run" / "checkpoints"),
                 "--figure-dir", str(figures), "--epochs", "1", "--hidden-dim", "16", *FAST_SCORES]
    main.main(run_flags)
    written = [figures / "explorer.html", figures / "architecture.png"]
    for path in written:
        assert path.stat().st_size > 1000, path
        path.unlink()
    main.main([*run_flags, "--eval"])
    assert all(path.stat().st_size > 1000 for path in written)
    data = page_data(figures / "explorer.html")
    assert [spec["name"] for spec in data["models"]] == ["VAE", "AE"] and data["dots"]["count"] == 64
    assert [sampler["model"] for sampler in data["samplers"]] == ["VAE", "AE", "AE"]  # the AE's fitted Gaussian too


# ------------------------------------------------------------------ architecture.png

def texts(figure):
    return [text.get_text() for text in figure.findobj(Text) if text.get_text()]


@pytest.mark.parametrize("arch, layers, expected", [
    ("mlp", 2, ["Linear + ReLU: 64"] * 8 + ["784 \u2192 64 \u2192 64 \u2192 2 x 7 \u2192 7 \u2192 64 \u2192 64 "
                                              "\u2192 784"]),
    ("conv", 1, ["Conv 4x4, stride 2 + ReLU: 32 x 14 x 14", "Linear + ReLU: 3136 = 64 x 7 x 7",
                 "ConvTranspose 4x4, stride 2: 1 x 28 x 28 logits"]),
])
def test_the_architecture_follows_the_config(tmp_path, arch, layers, expected):
    configs = {kind.upper(): ModelConfig(kind=kind, latent_dim=7, hidden_dim=64, arch=arch, hidden_layers=layers)
               for kind in ("vae", "ae")}
    figure = plots.architecture_figure(configs)
    shown = texts(figure)
    for text in set(expected):
        assert sum(text in item for item in shown) >= expected.count(text), (text, shown)
    assert len(figure.axes) == 2 and "$\\mu$: 7" in shown and "$\\log\\sigma^2$: 7" in shown
    assert any("KL" in item for item in shown) and "code z: 7" in shown  # the VAE's term, the AE's code
    plots.plot_architecture(configs, tmp_path / "architecture.png")
    assert (tmp_path / "architecture.png").read_bytes()[:4] == b"\x89PNG"


def test_one_model_draws_one_panel_and_each_config_its_own_picture(tmp_path):
    alone = plots.architecture_figure({"AE": ModelConfig(kind="ae", latent_dim=2)})
    assert len(alone.axes) == 1 and not any("KL" in item or "mu" in item for item in texts(alone))
    for latent_dim in (2, 3):
        plots.plot_architecture({"VAE": ModelConfig(kind="vae", latent_dim=latent_dim)},
                                tmp_path / f"{latent_dim}.png")
    assert (tmp_path / "2.png").read_bytes() != (tmp_path / "3.png").read_bytes()


# ------------------------------------------------------------------ the README's screenshot

def screenshot(page, out, *, width=1400, height=1180):
    """Open `page`, draw a 7 on the pad, select a test image, point at the VAE's plane (else the
    first), print the times of a decode and an encode, save `out`."""
    from selenium.webdriver.common.action_chains import ActionChains

    os.environ["SE_AVOID_STATS"] = "true"
    driver = start_chromium(width=width, height=height)
    try:
        open_page(driver, page)
        draw_stroke(driver, SEVEN)
        driver.execute_script("window.scrollTo(0, 0)")
        driver.execute_script("window.explorer.select(arguments[0])", 3)
        planes = driver.find_elements("css selector", "canvas.plane")
        plane = next((p for p in planes if p.get_attribute("data-model") == "VAE"), planes[0])
        ActionChains(driver).move_to_element_with_offset(plane, 120, -120).perform()
        for name in driver.execute_script("return window.explorer.models"):
            if driver.execute_script("return window.explorer.live(arguments[0])", name):
                median, mean = decode_milliseconds(driver, name)
                encode = driver.execute_script("""const pixels = window.explorer.drawing(), count = 200;
                    const start = performance.now();
                    for (let k = 0; k < count; k++) window.explorer.encode(arguments[0], pixels);
                    return (performance.now() - start) / count;""", name)
                print(f"{name}: one decode {median:.2f} ms (median of 200), {mean:.3f} ms (mean of 200); "
                      f"one encode {encode:.3f} ms (mean of 200)")
        errors = console_errors(driver)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()
    if errors:
        raise SystemExit(f"the page logged errors: {errors}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python tests/test_explorer.py PAGE.html OUT.png")
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]))


# ------------------------------------------------------------------ markers, the pad's view, the conditional page

def test_every_marker_is_in_the_legend_and_no_ellipse_takes_a_class_colour(browser, pages):
    open_page(browser, pages["both"][0])
    legend = browser.find_element("id", "marker-legend").text
    for words in ("cursor", "linked", "x the selected test image", "A B t", "interpolation", "D your drawing",
                  "the prior N(0, I)"):
        assert words in legend, (words, legend)
    colors = browser.execute_script("return window.explorer.markerColors()")
    classes = {color.lower() for color in plots.tab10_colors()}
    assert colors["selected"].lower() not in classes and colors["drawn"].lower() not in classes
    assert not console_errors(browser)


def test_small_copies_of_the_planes_beside_the_pad_keep_d_in_view_while_drawing(browser, pages):
    open_page(browser, pages["both"][0])
    before = {name: canvas_image(browser, f"mini-{name}") for name in ("VAE", "AE")}
    draw_stroke(browser, SEVEN)  # scrolls the pad into view
    for name in ("VAE", "AE"):
        assert canvas_image(browser, f"mini-{name}") != before[name]  # D and its ellipses drawn there
        assert browser.execute_script(  # on screen with the pad, the plane's own card off it
            "const box = arguments[0].getBoundingClientRect();"
            "return box.top >= 0 && box.bottom <= window.innerHeight",
            browser.find_element("id", f"mini-{name}"))
    mini = browser.execute_script(  # the copy is the plane, scaled
        "const mini = document.getElementById('mini-VAE'), copy = document.createElement('canvas');"
        "copy.width = mini.width; copy.height = mini.height;"
        "copy.getContext('2d').drawImage(document.querySelector('canvas.plane[data-model=\"VAE\"]'), 0, 0,"
        " mini.width, mini.height); return [copy.toDataURL(), mini.toDataURL()]")
    assert mini[0] == mini[1]
    assert not console_errors(browser)


def test_the_conditional_page_encodes_the_drawing_with_its_label_and_decodes_it_with_the_pickers(browser, pages):
    path, trained = pages["conditional"]
    open_page(browser, path)
    assert browser.find_element("id", "encoder-label-picker").is_displayed()
    browser.execute_script("window.explorer.setEncoderLabel(7); window.explorer.setLabel(2)")
    draw_stroke(browser, SEVEN)
    drawing, codes = browser.execute_script("return [window.explorer.drawing(), window.explorer.drawnCodes()]")
    for name, model in trained.items():
        assert np.abs(np.array(codes[name]["mu"]) - torch_codes(model, [drawing], 7)["mu"][0]).max() < 1e-3, name
        shown = browser.execute_script(  # the reconstruction shown: the code decoded with the decoders' label, 2
            f"const c = document.getElementById('drawn-{name}').getContext('2d').getImageData(0, 0, 28, 28).data;"
            "return Array.from({length: 784}, (_, j) => c[4 * j] / 255)")
        expected = torch_images(model, [codes[name]["mu"]], 2)[0]
        assert np.abs(np.array(shown) - expected).max() <= 2 * ONE_LEVEL + 1e-3, name
    caption = browser.find_element("id", "drawn-caption").text
    assert "encoders are given the label 7" in caption and "the decoders 2" in caption
    assert browser.execute_script("return window.explorer.encoderLabel()") == 7
    assert not console_errors(browser)


def mulberry32(seed):
    """The page's generator, bit for bit (JavaScript's 32-bit integer arithmetic, masked)."""
    state = seed & 0xFFFFFFFF

    def draw():
        nonlocal state
        state = (state + 0x6D2B79F5) & 0xFFFFFFFF
        r = ((state ^ (state >> 15)) * (1 | state)) & 0xFFFFFFFF
        r = ((r + (((r ^ (r >> 7)) * (61 | r)) & 0xFFFFFFFF)) ^ r) & 0xFFFFFFFF
        return ((r ^ (r >> 14)) & 0xFFFFFFFF) / 4294967296
    return draw


def page_gaussians(draw, count):
    """The page's Box-Muller draws, as gaussians() makes them."""
    out = []
    while len(out) < count:
        radius, angle = np.sqrt(-2 * np.log(1 - draw())), 2 * np.pi * draw()
        out += [radius * np.cos(angle), radius * np.sin(angle)]
    return out[:count]


def test_the_conditional_page_guesses_the_drawn_digit_by_bayes_rule_as_torch_does(browser, pages):
    path, trained = pages["conditional"]
    open_page(browser, path)
    vae, samples = trained["VAE"], browser.execute_script("return 16")  # GUESS_SAMPLES
    pixels = torch.rand(784, generator=torch.Generator().manual_seed(5))
    got = np.array(browser.execute_script("return window.explorer.labelProbabilities('VAE', arguments[0])",
                                          pixels.tolist()))
    log_likelihoods = []
    for label in range(10):  # the same noise for every label, as the page and scoring draw it
        draw = mulberry32(77)
        eps = torch.tensor([page_gaussians(draw, vae.latent_dim) for _ in range(samples)], dtype=torch.float32)
        with torch.no_grad():
            log_weights = vae.log_importance_weights(pixels[None], samples, labels=torch.tensor([label]),
                                                     eps=eps[:, None, :])[:, 0].double()
        log_likelihoods.append(torch.logsumexp(log_weights, 0) - np.log(samples))
    expected = torch.softmax(torch.stack(log_likelihoods), 0).numpy()
    assert abs(got.sum() - 1) < 1e-9 and np.abs(got - expected).max() < 2e-3, (got, expected)
    draw_stroke(browser, SEVEN)
    guess = browser.execute_script("return window.explorer.guess()")
    assert guess["label"] == int(np.argmax(guess["probabilities"])) and 0 < guess["probability"] <= 1
    assert f"thinks it is a {guess['label']} (p = {guess['probability']:.2f})" in \
        browser.find_element("id", "drawn-caption").text
    open_page(browser, pages["both"][0])  # no conditional model: no guess, no encoder's label
    draw_stroke(browser, SEVEN)
    assert browser.execute_script("return window.explorer.guess()") is None
    assert not browser.find_element("id", "encoder-label-picker").is_displayed()
