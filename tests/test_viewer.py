"""Tests for tinyddpm.viewer: the frames it embeds, its size bound, its refusals,
and the page itself, opened in a real headless Chromium from a file:// path.

The browser tests build a small page from synthetic frames (no model), move
the slider through the DevTools protocol (tests/chromium.py), and read back
from the page what it shows: the canvases' pixels, the numbers beside the
slider, and a screenshot decoded with Pillow. They skip when Chromium is not
installed, except under CI (the environment variable CI set), where a
missing browser is a failure: the CI script installs it.
"""
import base64
import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from chromium import Chromium, find_chromium
from tinyddpm import viewer
from tinyddpm.schedule import linear_betas
from tinyddpm.viewer import ViewerError

ALPHAS_CUMPROD = np.cumprod(1.0 - linear_betas(1000))


def synthetic_chain(steps=6, n=3, size=10, digits=2, seed=0):
    """Frames whose every pixel survives the page's 8-bit encoding exactly (k / 127.5 - 1)."""
    rng = np.random.default_rng(seed)
    S = steps + 1

    def frames(count):
        return rng.integers(0, 256, size=(S, count, size, size)) / 127.5 - 1.0

    timesteps = np.append(np.round(np.linspace(1000, 1, steps)).astype(np.int64), 0)
    alpha_bar = viewer.alpha_bar_at(ALPHAS_CUMPROD, timesteps)
    sigma = np.append(np.linspace(0.2, 0.0, steps), 0.0)
    return dict(xt_frames=frames(n), x0_frames=frames(n), timesteps=timesteps, alpha_bar=alpha_bar,
                sigma=sigma, forward_frames=frames(digits))


def to_pixels(frame):
    return np.round((np.asarray(frame) + 1.0) * 127.5).astype(np.uint8)


# =============================================================================
# The frames and numbers (no browser)
# =============================================================================

def test_alpha_bar_at_counts_t_from_one_with_alpha_bar_0_equal_to_one():
    alpha_bar = viewer.alpha_bar_at(ALPHAS_CUMPROD, np.array([1000, 500, 1, 0]))
    np.testing.assert_array_equal(alpha_bar, [ALPHAS_CUMPROD[999], ALPHAS_CUMPROD[499], ALPHAS_CUMPROD[0], 1.0])
    with pytest.raises(ViewerError, match="0..T = 1000"):
        viewer.alpha_bar_at(ALPHAS_CUMPROD, np.array([1001, 0]))


def test_forward_frames_are_eq_4_with_one_noise_shared_by_all_t():
    digits = np.random.default_rng(1).uniform(-1, 1, size=(2, 28, 28))
    timesteps = np.array([1000, 700, 300, 50, 1, 0])
    frames = viewer.forward_process_frames(digits, viewer.alpha_bar_at(ALPHAS_CUMPROD, timesteps), seed=3)
    assert frames.shape == (6, 2, 28, 28) and frames.dtype == np.float32
    np.testing.assert_allclose(frames[-1], digits, atol=1e-6)         # t = 0 is x_0 itself
    # Solving eq. 4 for eps gives the same eps at every t > 0, and it looks standard normal.
    alpha_bar = ALPHAS_CUMPROD[timesteps[:-1] - 1][:, None, None, None]
    eps = (frames[:-1] - np.sqrt(alpha_bar) * digits) / np.sqrt(1.0 - alpha_bar)
    np.testing.assert_allclose(eps, np.broadcast_to(eps[0], eps.shape), atol=1e-4)
    assert abs(eps[0].mean()) < 0.1 and abs(eps[0].std() - 1.0) < 0.1


def test_forward_frames_refuse_an_alpha_bar_outside_0_1():
    with pytest.raises(ViewerError, match="alpha_bar"):
        viewer.forward_process_frames(np.zeros((28, 28)), np.array([0.5, 1.5]))


def test_first_of_each_digit_picks_digits_in_order():
    labels = np.array([3, 1, 0, 1, 2, 0])
    images = np.arange(6, dtype=np.float32)[:, None, None, None] * np.ones((6, 1, 4, 4), np.float32)
    chosen = viewer.first_of_each_digit(images, labels, k=3)
    assert chosen.shape == (3, 4, 4)
    np.testing.assert_array_equal(chosen[:, 0, 0], [2, 1, 4])
    with pytest.raises(ViewerError, match="digit 4"):
        viewer.first_of_each_digit(images, labels, k=5)


# =============================================================================
# Size: bounded before sampling, refused over 5 MB
# =============================================================================

def test_size_bound_holds_for_incompressible_frames_and_is_close(tmp_path):
    # Uniform random pixels are the worst case for PNG: the page must still be under the bound.
    n, steps, size = 8, 30, 28
    chain = synthetic_chain(steps=steps, n=n, size=size, digits=viewer.FORWARD_DIGITS)
    written = viewer.write_viewer(tmp_path / "view.html", **chain, meta={"checkpoint": "x" * 200})
    bound = viewer.viewer_size_bytes(n, steps, size, viewer.FORWARD_DIGITS)
    assert written == (tmp_path / "view.html").stat().st_size
    assert 0.95 * bound < written <= bound


def test_the_defaults_fit_in_5_mb_and_larger_requests_are_refused_with_what_fits():
    size = viewer.check_viewer_size(viewer.DEFAULT_SAMPLES, viewer.DEFAULT_STEPS)
    assert size <= viewer.MAX_BYTES
    with pytest.raises(ViewerError) as exc_info:
        viewer.check_viewer_size(64, 100)
    message = str(exc_info.value)
    assert "\n" not in message and "5 MB" in message
    most = int(re.search(r"at most (\d+) samples at 100 steps", message).group(1))
    assert viewer.viewer_size_bytes(most, 100) <= viewer.MAX_BYTES < viewer.viewer_size_bytes(most + 1, 100)
    most_steps = int(re.search(r"at most (\d+) steps for 64 samples", message).group(1))
    assert viewer.viewer_size_bytes(64, most_steps) <= viewer.MAX_BYTES < viewer.viewer_size_bytes(64, most_steps + 1)


@pytest.mark.parametrize("change, words", [
    (dict(x0_frames=np.zeros((7, 2, 10, 10))), "must match"),
    (dict(timesteps=np.arange(7)[::-1] + 1), "decrease to 0"),
    (dict(timesteps=np.array([9, 8, 8, 3, 2, 1, 0])), "decrease to 0"),
    (dict(alpha_bar=np.full(6, 0.5)), "alpha_bar must be 7"),
    (dict(sigma=np.full(7, np.nan)), "sigma must be 7 finite"),
    (dict(xt_frames=np.full((7, 3, 10, 10), np.inf)), "NaN or infinite"),
    (dict(forward_frames=np.zeros((7, 2, 12, 12))), "forward_frames"),
])
def test_frames_that_do_not_fit_together_are_refused(change, words):
    with pytest.raises(ViewerError, match=words):
        viewer.viewer_html(**dict(synthetic_chain(), **change))


def test_page_refers_to_nothing_outside_itself_and_escapes_what_it_is_given():
    page = viewer.viewer_html(**synthetic_chain(), title="<b>tiny</b> {{data}}",
                              meta={"checkpoint": "</script><script>alert(1)</script>"})
    # The SVG namespace is a name, not a fetch; every other URL would need the network.
    urls = set(re.findall(r"\w+://[^\s\"'<>)]*", page))
    assert urls == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)
    assert "<b>tiny</b>" not in page and "&lt;b&gt;tiny&lt;/b&gt; {{data}}" in page
    assert page.count("</script>") == 2                  # the data block's and the program's own


# =============================================================================
# In a real browser
# =============================================================================

@pytest.fixture(scope="module")
def browser():
    if find_chromium() is None:
        reason = "chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{reason}; CI must run the browser tests")
        pytest.skip(reason)
    with Chromium(width=1100, height=900) as chromium:
        yield chromium


@pytest.fixture
def chain():
    return synthetic_chain()


def open_page(browser, tmp_path, chain):
    path = tmp_path / "view.html"
    viewer.write_viewer(path, **chain, meta={"test": "synthetic frames"})
    page = browser.open(path.resolve().as_uri())
    page.wait_for("document.body.dataset.ready === 'true'")
    return page


def shown(page, grid, kind, index):
    """The gray levels a canvas of the page holds, read back with getImageData: (H, W) uint8."""
    rgba = page.evaluate(f"""(() => {{
        const canvas = document.querySelector('#{grid} canvas.{kind}[data-index="{index}"]');
        return Array.from(canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data);
    }})()""")
    size = int(np.sqrt(len(rgba) // 4))
    rgba = np.array(rgba, dtype=np.uint8).reshape(size, size, 4)
    assert np.all(rgba[..., 0] == rgba[..., 1]) and np.all(rgba[..., 3] == 255)
    return rgba[..., 0]


def move_slider(page, step):
    """What a user's drag does: set the range input's value and fire its input event."""
    page.evaluate(f"""(() => {{
        const slider = document.getElementById('step');
        slider.value = {step};
        slider.dispatchEvent(new Event('input', {{ bubbles: true }}));
    }})()""")


def text(page, element_id):
    return page.evaluate(f"document.getElementById('{element_id}').textContent")


def test_slider_shows_the_embedded_frames_of_the_chosen_step(browser, tmp_path, chain):
    page = open_page(browser, tmp_path, chain)
    n = chain["xt_frames"].shape[1]
    assert page.evaluate("+document.getElementById('step').max") == len(chain["timesteps"]) - 1
    first = [shown(page, "reverse-grid", "xt", i) for i in range(n)]
    for i in range(n):                                   # the page opens at x_T
        np.testing.assert_array_equal(first[i], to_pixels(chain["xt_frames"][0, i]))

    for step in (4, 2, 6):
        move_slider(page, step)
        for i in range(n):
            np.testing.assert_array_equal(shown(page, "reverse-grid", "xt", i),
                                          to_pixels(chain["xt_frames"][step, i]), err_msg=f"x_t {step} {i}")
            np.testing.assert_array_equal(shown(page, "reverse-grid", "x0", i),
                                          to_pixels(chain["x0_frames"][step, i]), err_msg=f"x_0 {step} {i}")
        assert int(text(page, "t")) == chain["timesteps"][step]
        assert float(text(page, "alpha-bar")) == pytest.approx(chain["alpha_bar"][step], rel=1e-3)
    assert not np.array_equal(shown(page, "reverse-grid", "xt", 0), first[0])
    assert text(page, "sigma") == "none"                 # the final samples: no step leaves them


def test_the_screen_shows_each_frame_pixel_scaled_up_unblurred(browser, tmp_path, chain):
    page = open_page(browser, tmp_path, chain)
    move_slider(page, 3)
    box = page.evaluate("""(() => {
        const r = document.querySelector('#reverse-grid canvas.x0[data-index="1"]').getBoundingClientRect();
        return [r.x + window.scrollX, r.y + window.scrollY, r.width, r.height];
    })()""")
    png = page.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
        "x": box[0], "y": box[1], "width": box[2], "height": box[3], "scale": 1}})["data"]
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(png))).convert("L"))
    expected = to_pixels(chain["x0_frames"][3, 1])
    scale = picture.shape[0] // expected.shape[0]
    assert scale >= 2 and picture.shape == (expected.shape[0] * scale, expected.shape[1] * scale)
    # Every screen pixel of a block shows its image pixel: a smoothed upscale would blend neighbours.
    np.testing.assert_array_equal(picture, np.kron(expected, np.ones((scale, scale), np.uint8)))


def test_forward_tab_shows_real_digits_noised_to_the_slider_t(browser, tmp_path, chain):
    page = open_page(browser, tmp_path, chain)
    assert page.evaluate("document.getElementById('forward').hidden")
    page.evaluate("document.getElementById('tab-forward').click()")
    assert page.evaluate("!document.getElementById('forward').hidden && document.getElementById('reverse').hidden")
    move_slider(page, 5)
    for i in range(chain["forward_frames"].shape[1]):
        np.testing.assert_array_equal(shown(page, "forward-grid", "xt", i), to_pixels(chain["forward_frames"][5, i]))
        np.testing.assert_array_equal(shown(page, "forward-grid", "x0", i), to_pixels(chain["forward_frames"][-1, i]))


def test_play_advances_to_the_end_and_pause_stops(browser, tmp_path, chain):
    page = open_page(browser, tmp_path, chain)
    page.evaluate("document.getElementById('play').click()")
    last = len(chain["timesteps"]) - 1
    page.wait_for(f"+document.getElementById('step').value === {last}", timeout=5)
    page.wait_for("document.getElementById('play').textContent.includes('Play')", timeout=2)
    np.testing.assert_array_equal(shown(page, "reverse-grid", "xt", 0), to_pixels(chain["xt_frames"][last, 0]))

    page.evaluate("document.getElementById('play').click()")          # from the end, starts over
    page.wait_for("+document.getElementById('step').value > 0 && +document.getElementById('step').value < "
                  f"{last}", timeout=2)
    page.evaluate("document.getElementById('play').click()")
    stopped = page.evaluate("+document.getElementById('step').value")
    page.evaluate("new Promise((done) => setTimeout(done, 300))")
    assert page.evaluate("+document.getElementById('step').value") == stopped


def test_page_loads_nothing_but_itself_and_its_data_uris(browser, tmp_path, chain):
    page = open_page(browser, tmp_path, chain)
    urls = page.requested_urls()
    assert urls and urls[0] == (tmp_path / "view.html").resolve().as_uri()
    assert all(url.startswith("data:") for url in urls[1:]), urls
    fetched = page.evaluate("performance.getEntriesByType('resource').filter(e => !e.name.startsWith('data:'))"
                           ".map(e => e.name)")
    assert fetched == []


def test_page_without_real_digits_says_so(browser, tmp_path, chain):
    page = open_page(browser, tmp_path, dict(chain, forward_frames=None))
    page.evaluate("document.getElementById('tab-forward').click()")
    assert page.evaluate("!document.getElementById('forward-missing').hidden")
    assert page.evaluate("document.querySelectorAll('#forward-grid canvas').length") == 0
