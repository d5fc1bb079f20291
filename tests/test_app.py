"""The web page: driven through gradio_client, and in a real headless browser (Debian's Chromium)."""

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import av
import numpy as np
import PIL.Image
import pytest
import soundfile

from diffused_heads import builtin_model_path, example_audio_path, example_image_path

from helpers import free_port, pasted_and_beside, tiny_pipeline
from talking_videos import hopper

pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
from gradio_client import Client, handle_file  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.slow  # a server in another process, and a browser


def frames_in(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """Short cuts of the example sentence: 0.6 s (15 frames), 1.6 s and a corrupt file."""
    folder = tmp_path_factory.mktemp("speech")
    waveform, rate = soundfile.read(example_audio_path(), dtype="float32")
    soundfile.write(folder / "short.wav", waveform[: int(0.6 * rate)], rate)
    soundfile.write(folder / "long.wav", waveform[: int(1.6 * rate)], rate)
    soundfile.write(folder / "blip.wav", waveform[: int(0.03 * rate)], rate)
    (folder / "corrupt.wav").write_bytes(b"RIFF\x00\x00 not really a wave file")
    return folder


@pytest.fixture(scope="module")
def offered(tmp_path_factory):
    """The models the test page offers: the built-in student by its name and an untrained tiny one."""
    folder = tmp_path_factory.mktemp("models") / "tiny"
    tiny_pipeline().save_pretrained(folder)
    return ["builtin-fast", str(folder)]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory, offered):
    """The app on a free localhost port (speech up to 1.2 s, uploads up to 1 MB, pictures up to 4 megapixels, 2
    waiting requests), with its own temporary folder, stopped after the module's tests; it must leave that folder
    empty."""
    port = free_port()
    folder = tmp_path_factory.mktemp("app")
    temporary = folder / "tmp"
    temporary.mkdir()
    log = folder / "app.log"
    command = [sys.executable, "-m", "diffused_heads", "app", "--port", str(port), "--max-seconds", "1.2"]
    command += ["--max-upload-mb", "1", "--max-megapixels", "4", "--max-queue", "2"]
    for model in offered:
        command += ["--model", model]
    environment = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    environment["TMPDIR"] = str(temporary)
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                pytest.fail(f"the app did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
    yield url, process, temporary
    process.terminate()
    process.wait(timeout=30)
    assert os.listdir(temporary) == [], "the app left files behind"


def request(
    client,
    face,
    speech,
    model="builtin-fast",
    steps=2,
    scheduler="the model's own",
    seed=0,
    stabilize="0",
    prepare=True,
    paste_back=False,
):
    return client.predict(
        handle_file(str(face)),
        handle_file(str(speech)),
        model,
        steps,
        scheduler,
        seed,
        stabilize,
        prepare,
        paste_back,
        api_name="/generate",
    )


def test_generation_errors_and_the_queue_through_the_api(server, speech, tmp_path):
    client = Client(server[0], verbose=False)
    video, identity, last_frame = request(client, example_image_path(), speech / "short.wav")
    assert frames_in(video) == (int(0.6 * 16000) + 2560 - 3200) // 640 + 1 == 15
    assert os.path.isfile(identity) and os.path.isfile(last_frame)

    # Bad input: a readable message, and the app keeps serving.
    for name, message in [
        ("corrupt.wav", "could not be read as audio"),
        ("blip.wav", "too short"),
        ("long.wav", "the speech is 1.6 s long; this page takes up to 1.2 s"),
    ]:
        with pytest.raises(Exception, match=message) as error:
            request(client, example_image_path(), speech / name)
        assert "Traceback" not in str(error.value)
        # names the file, not the server's copy of it (under the server's temporary folder)
        assert str(server[2]) not in str(error.value) and "/gradio/" not in str(error.value)
    with pytest.raises(Exception, match="could not be read as audio") as error:
        request(client, example_image_path(), speech / "corrupt.wav")
    assert "corrupt.wav" in str(error.value)

    # Two requests at once: the second waits for the first and is not lost; frames show while they are made.
    jobs = [
        client.submit(
            handle_file(example_image_path()),
            handle_file(str(speech / "short.wav")),
            "builtin-fast",
            2,
            "ddim",
            seed,
            "0",
            True,
            api_name="/generate",
        )
        for seed in (1, 2)
    ]
    results = [job.result(timeout=120) for job in jobs]
    assert all(frames_in(video) == 15 for video, _, _ in results)
    with av.open(results[0][0]) as a, av.open(results[1][0]) as b:  # each request's seed
        seed_1 = np.stack([f.to_ndarray(format="rgb24") for f in a.decode(video=0)]).astype(float)
        seed_2 = np.stack([f.to_ndarray(format="rgb24") for f in b.decode(video=0)]).astype(float)
    assert np.abs(seed_1 - seed_2).mean() > 0.5
    updates = jobs[0].outputs()
    assert len(updates) == 4 and all(update[0] is None for update in updates[:3])  # frames 0, 5 and 10, then the video


def test_switching_models_loads_the_other_model_and_only_the_offered_ones(server, speech, offered):
    client = Client(server[0], verbose=False)
    builtin_video, _, _ = request(client, example_image_path(), speech / "short.wav", model="builtin-fast")
    tiny_video, _, _ = request(client, example_image_path(), speech / "short.wav", model="tiny")
    with av.open(builtin_video) as a, av.open(tiny_video) as b:
        first_a = next(a.decode(video=0)).to_ndarray(format="rgb24").astype(float)
        first_b = next(b.decode(video=0)).to_ndarray(format="rgb24").astype(float)
    assert np.abs(first_a - first_b).mean() > 10  # an untrained tiny UNet draws nothing like the trained face
    answers = set()
    for typed in ("/etc/passwd", os.path.dirname(offered[1]), "/root/.ssh", "no-such-model", "user/some-repo"):
        # Gradio itself refuses a value outside the list; the page would too (Models.get).
        with pytest.raises(Exception, match="not in the list of choices") as error:
            request(client, example_image_path(), speech / "short.wav", model=typed)
        answers.add(str(error.value).replace(typed, "VALUE"))
    assert len(answers) == 1, answers  # the same answer for a file, a folder and nothing: no probing


def test_in_the_original_photo_the_video_is_the_photo_at_its_size(server, speech, tmp_path):
    """The page's "in the original photo": a portrait gives a video of its own size with the head in the box the
    paste writes in and the photo right beside it (up to the video codec's loss); asked without preparing the
    face, a readable error."""
    client = Client(server[0], verbose=False)
    photo = hopper()
    photo.save(tmp_path / "portrait.jpg", quality=95)
    video, _, _ = request(client, tmp_path / "portrait.jpg", speech / "short.wav", paste_back=True)
    with av.open(str(video)) as container:
        first = next(container.decode(video=0)).to_ndarray(format="rgb24")
    original = np.asarray(PIL.Image.open(tmp_path / "portrait.jpg").convert("RGB"), np.float32)
    assert first.shape == original.shape
    inside, beside = pasted_and_beside(first, tmp_path / "portrait.jpg", builtin_model_path())
    assert inside > 10 and beside < 6.0  # the head in its box, the photo right beside it
    with pytest.raises(Exception, match="only when the face is prepared"):
        request(client, tmp_path / "portrait.jpg", speech / "short.wav", prepare=False, paste_back=True)


def test_limits_turn_away_huge_pictures_large_uploads_and_a_full_queue(server, speech, tmp_path):
    url, process, _ = server
    client = Client(url, verbose=False)
    PIL.Image.new("L", (13000, 13000)).save(tmp_path / "huge.png")  # 13000x13000 pixels in a few dozen KB
    before = rss_mb(process.pid)
    with pytest.raises(Exception, match="13000x13000 pixels; this page takes up to 4 million"):
        request(client, tmp_path / "huge.png", speech / "short.wav")
    assert rss_mb(process.pid) - before < 150  # the picture was never decoded

    noise = np.random.RandomState(0).randint(0, 256, (1200, 1200, 3), dtype=np.uint8)
    PIL.Image.fromarray(noise).save(tmp_path / "large.png")  # about 4 MB, over the 1 MB limit
    assert (tmp_path / "large.png").stat().st_size > 2 * 1024 * 1024
    with pytest.raises(Exception, match="(?i)file.*(size|large)|exceeds|limit"):
        request(client, tmp_path / "large.png", speech / "short.wav")

    # Two may wait: of five requests sent at once, some are turned away, and those taken all finish.
    jobs = [
        client.submit(
            handle_file(example_image_path()),
            handle_file(str(speech / "short.wav")),
            "builtin-fast",
            2,
            "the model's own",
            seed,
            "0",
            True,
            api_name="/generate",
        )
        for seed in range(5)
    ]
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(frames_in(job.result(timeout=180)[0]))
        except Exception as error:
            outcomes.append(str(error))
    finished = [o for o in outcomes if o == 15]
    turned_away = [o for o in outcomes if isinstance(o, str)]
    assert 1 <= len(finished) <= 4 and turned_away, outcomes
    assert all("queue" in message.lower() for message in turned_away), turned_away


def test_the_page_keeps_the_models_defaults_unless_told_otherwise(tmp_path, stream_calls):
    from diffused_heads import runtime
    from diffused_heads.serving import OWN, Limits, Models, run_request

    calls = stream_calls
    waveform, rate = soundfile.read(example_audio_path(), dtype="float32")
    soundfile.write(tmp_path / "s.wav", waveform[: int(0.12 * rate)], rate)
    models = Models([None])
    args = (models, example_image_path(), str(tmp_path / "s.wav"), "")
    for steps, stabilize in ((OWN, OWN), ("3", "0 (off)"), (4, 5)):
        list(run_request(*args, steps, OWN, 0, stabilize, True, Limits(), str(tmp_path)))
    # The default built-in model is the 2-step student.
    assert [(c["num_inference_steps"], c["stabilize_every"]) for c in calls] == [(2, None), (3, 0), (4, 5)]
    assert runtime.default_steps(models.get(None)[1]) == 2


def test_the_page_in_a_real_browser(server, speech, tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI must install Chromium and its driver (Debian: chromium chromium-driver)")
        pytest.skip("no Chromium and chromedriver from the system's packages (Debian: chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    # The driver from the system's packages: selenium is never left to fetch one.
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        browser.get(server[0])
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "input[type=file]"))
        face_input = browser.find_elements(By.CSS_SELECTOR, "input[type=file]")[0]
        assert "image" in face_input.get_attribute("accept")
        face_input.send_keys(example_image_path())
        wait.until(lambda b: "identity.png" in b.page_source)
        audio_input = next(
            i
            for i in browser.find_elements(By.CSS_SELECTOR, "input[type=file]")
            if "audio" in i.get_attribute("accept")
        )
        audio_input.send_keys(str(speech / "short.wav"))
        time.sleep(1)
        next(b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Generate").click()
        duration = WebDriverWait(browser, 180).until(
            lambda b: b.execute_script(
                "const v = document.querySelector('video');"
                "return v && v.src && v.readyState >= 1 && isFinite(v.duration) ? v.duration : null"
            )
        )
        assert abs(duration - 0.6) < 0.05, duration  # 15 frames at 25 fps
        browser.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 10_000
    finally:
        browser.quit()


def test_without_gradio_the_command_says_what_to_install(monkeypatch, capsys):
    from diffused_heads import app
    from diffused_heads.serving import APP_EXTRA

    monkeypatch.setitem(sys.modules, "gradio", None)
    assert app.main(["--port", str(free_port())]) == 1
    assert capsys.readouterr().err.strip() == f"error: {APP_EXTRA}"


def test_progress_reports_frames_and_steps(tmp_path):
    from diffused_heads.serving import Limits, Models, run_request

    waveform, rate = soundfile.read(example_audio_path(), dtype="float32")
    soundfile.write(tmp_path / "s.wav", waveform[: int(0.2 * rate)], rate)  # 5 frames
    calls = []
    outputs = run_request(
        Models([None]),
        example_image_path(),
        str(tmp_path / "s.wav"),
        "",
        3,
        "the model's own",
        0,
        0,
        True,
        Limits(max_seconds=5.0),
        str(tmp_path),
        progress=lambda value, desc: calls.append((value, desc)),
    )
    assert [video is None for video, _, _, _ in outputs] == [True, False]  # frame 0 shown, then the video
    assert [value for value, _ in calls] == [(k, 15) for k in range(1, 16)]
    assert calls[0][1].startswith("frame 1/5") and calls[-1][1].startswith("frame 5/5")


def test_a_requests_warnings_follow_it_from_thread_to_thread(tmp_path, monkeypatch):
    """Gradio runs each step of the request's generator on a worker thread of its own: a warning said in a later
    step (here by the preview of frame 5) reaches the request's list, and a warning of another thread does not."""
    import logging
    import threading

    from diffused_heads import serving
    from diffused_heads.serving import Limits, Models, run_request

    shown = serving.for_display
    logger = logging.getLogger("diffused_heads.test")

    def for_display(frame):
        logger.warning("a warning while showing a frame")
        other = threading.Thread(target=lambda: logger.warning("another request's warning"))
        other.start()
        other.join()
        return shown(frame)

    monkeypatch.setattr(serving, "for_display", for_display)
    monkeypatch.setattr(serving, "PREVIEW_EVERY", 5)
    waveform, rate = soundfile.read(example_audio_path(), dtype="float32")
    soundfile.write(tmp_path / "s.wav", waveform[: int(0.4 * rate)], rate)  # 10 frames
    steps = run_request(
        Models([None]), example_image_path(), str(tmp_path / "s.wav"), "", 1, "", 0, 0, True, Limits(), str(tmp_path)
    )
    outputs = []
    while True:  # each step on a new thread, as Gradio's worker threads run them
        result = []
        worker = threading.Thread(target=lambda: result.append(next(steps, None)))
        worker.start()
        worker.join()
        if result[0] is None:
            break
        outputs.append(result[0])
    warnings = outputs[-1][3]
    assert warnings.count("a warning while showing a frame") == len(outputs) == 3
    assert "another request's warning" not in warnings
