"""The README's picture of the `vitforge serve` page: a trained run served on 127.0.0.1, three digits uploaded in
headless Chromium (Debian's chromium + chromium-driver, driven by Selenium) on a phone-sized window.

    vitforge demo                                  # or any run trained on the digits
    python docs/serve_screenshot.py runs/<demo run> --out docs/serve_page.png

The three images are digits of different classes from scikit-learn's digits (the run may have trained on them: the
picture shows the page, the run's held-out accuracy is the number printed on it).
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from sklearn.datasets import load_digits

from vitforge.serve import Predictor, ServeOptions, build_server


def held_out_digits(n: int) -> list[tuple[str, bytes]]:
    """`n` digits of different classes (scanning scikit-learn's digits from the end), as 8x8 greyscale PNGs."""
    d = load_digits()
    grey = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    out, seen = [], set()
    for i in range(len(grey) - 1, 0, -1):
        if d.target[i] not in seen:
            seen.add(d.target[i])
            buf = io.BytesIO()
            Image.fromarray(grey[i]).save(buf, "PNG")
            out.append((f"digit_{d.target[i]}.png", buf.getvalue()))
        if len(out) == n:
            return out
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory or checkpoint trained on the digits")
    p.add_argument("--out", default="docs/serve_page.png")
    a = p.parse_args()
    server, sock = build_server(Predictor([a.run], device="cpu"), ServeOptions(port=0))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    tmp = Path(tempfile.mkdtemp())
    files = []
    for name, data in held_out_digits(3):
        (tmp / name).write_bytes(data)
        files.append(str(tmp / name))
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp}/p"):
        opts.add_argument(flag)
    opts.add_experimental_option("mobileEmulation", {"deviceMetrics": {"width": 390, "height": 844, "pixelRatio": 2}})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=opts, service=service)
    try:
        driver.get(f"{base}/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "file").send_keys("\n".join(files))
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card[data-state=done]")) == 3)
        driver.save_screenshot(str(tmp / "page.png"))
    finally:
        driver.quit()
        server.should_exit = True
    with Image.open(tmp / "page.png") as im:  # half size, 64-colour palette: a few tens of kB in the repository
        im.convert("RGB").resize((390, 844), Image.LANCZOS).quantize(64).save(a.out, optimize=True)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
