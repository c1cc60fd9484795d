"""Promotion in the MLflow UI drives the system, every part a real process: ``vilbert registry ui`` (what ``make ui``
starts: an ``mlflow server`` with the alias-event listener beside it), two concurrent ``vilbert register`` runs,
``vilbert promote``, ``vilbert serve`` following ``champion``, and headless Chromium setting the alias in the UI as a
person would.  Then: the audit record, ``previous-champion``, the server answering with the new version, and
``vilbert rollback`` undoing the UI's promotion; a champion that cannot load is flagged and never takes traffic.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``make browser`` installs them) and is skipped,
saying so, without them.  ``VILBERT_SCREENSHOT=path.png`` keeps the screenshot of the UI after the promotion (the
README's picture is made that way).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components.registry.events import ALIAS_HISTORY_TAG
from components.registry.rules import HISTORY_TAG, VIOLATIONS_TAG
from components.registry.ui import stop_process, wait_until_up
from tests.components.test_data_world import shared_world
from tests.components.test_registry_events import aliases, history, wait_for
from tests.components.test_serving import (
    expected_vqa,
    free_port,
    make_evaluation,
    make_model,
    serving_env,
    shared_store,
    world_png,
)

pytestmark = pytest.mark.slow

VILBERT = str(Path(sys.executable).with_name("vilbert"))
NAME, QUESTION = "vilbert-vqa", "what colour is the circle?"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@dataclass
class Stack:
    uri: str
    serve_url: str
    versions: dict[float, str]
    """Registered version per evaluation value (40.0: the first champion, 45.0: the challenger)."""
    folders: dict[str, Path]
    store: Path
    base: Path
    env: dict[str, str]
    logs: dict[str, Path]

    def log_tail(self) -> str:
        return "\n".join(f"--- {n}:\n{p.read_text()[-2500:]}" for n, p in self.logs.items() if p.exists())

    def cli(self, *args: str) -> str:
        done = subprocess.run([VILBERT, *args, "--tracking-uri", self.uri], env=self.env, cwd=self.base,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def ask(self) -> tuple[str, str, dict]:
        """POST /invocations: (version in the header, version in the body, the prediction)."""
        png = base64.b64encode(world_png()).decode()
        body = json.dumps({"dataframe_split": {"columns": ["image", "text"], "data": [[png, QUESTION]]}}).encode()
        request = urllib.request.Request(self.serve_url + "/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            answer = json.loads(resp.read())
            return resp.headers["X-Model-Version"], answer["model"]["version"], answer["predictions"][0]

    def status(self) -> dict:
        with urllib.request.urlopen(self.serve_url + "/version", timeout=10) as resp:
            return json.loads(resp.read())


def start(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    world = shared_world(tmp_path_factory)
    store = shared_store(world, tmp_path_factory)
    base = tmp_path_factory.mktemp("registry_ui")
    ui_port, listen_port, serve_port = free_port(), free_port(), free_port()
    uri = f"http://127.0.0.1:{ui_port}"
    env = {**serving_env(uri), "VILBERT_UI_LOG": str(base / "mlflow-server.log")}
    logs = {"ui": base / "ui.log", "mlflow server": base / "mlflow-server.log", "serve": base / "serve.log"}
    procs = [start([VILBERT, "registry", "ui", "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}", "--port",
                    str(ui_port), "--listen-port", str(listen_port), "--state-file", str(base / "state.json")],
                   env, base, logs["ui"])]  # fmt: skip
    try:
        wait_until_up(f"http://127.0.0.1:{listen_port}/health", procs[0], logs["ui"])  # after the server: it is up
        # two concurrent `vilbert register` runs: whichever is gated first, the better one ends as challenger
        folders = {value: make_model(base, "vqa", store, world, seed=seed) for seed, value in ((0, 40.0), (1, 45.0))}
        outputs = {value: base / f"register-{value:g}.json" for value in folders}
        registering = [start([VILBERT, "register", "--model", str(folder), "--evaluation",
                              str(make_evaluation(base, "vqa", value, folder)), "--tracking-uri", uri, "--output",
                              str(outputs[value])], env, base, base / f"register-{value:g}.log")
                       for value, folder in folders.items()]  # fmt: skip
        for proc, value in zip(registering, folders, strict=True):
            assert proc.wait(timeout=300) == 0, (base / f"register-{value:g}.log").read_text()[-3000:]
        versions = {value: json.loads(path.read_text())["version"] for value, path in outputs.items()}
        client = MlflowClient(uri, registry_uri=uri)
        assert aliases(client, NAME) == {"challenger": versions[45.0]}
        stack = Stack(uri, f"http://127.0.0.1:{serve_port}", versions,
                      {versions[v]: f for v, f in folders.items()}, store, base, env, logs)  # fmt: skip
        stack.cli("promote", "--name", NAME, "--version", versions[40.0], "--reason", "first model, checked by hand",
                  "--actor", "tester")  # fmt: skip
        procs.append(start([VILBERT, "serve", "--name", NAME, "--tracking-uri", uri, "--port", str(serve_port),
                            "--poll", "0"], env, base, logs["serve"]))  # fmt: skip
        wait_until_up(stack.serve_url + "/ping", procs[1], logs["serve"], timeout_s=180)
        yield stack
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        for proc in procs:  # a clean exit: the listener and serve unsubscribed, the server stopped
            assert proc.returncode == 0, (proc.args, (base / "ui.log").read_text()[-3000:])


def answered_by(stack: Stack, version: str, timeout_s: float = 60.0) -> dict:
    """Wait until the server answers with ``version`` (header and body agree); returns the prediction."""

    def check():
        header, body, prediction = stack.ask()
        assert header == body
        return prediction if header == version else None

    return wait_for(check, f"version {version} answering", timeout_s=timeout_s)


def test_a_promotion_in_the_ui_is_audited_served_and_rolled_back(stack: Stack, tmp_path) -> None:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed (`make browser` installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    client = MlflowClient(stack.uri, registry_uri=stack.uri)
    old, new = stack.versions[40.0], stack.versions[45.0]
    answer = answered_by(stack, old)
    assert answer["answer"] == expected_vqa(stack.folders[old], stack.store, world_png(), QUESTION)[0]
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(f"{stack.uri}/#/models/{NAME}/versions/{new}")  # the challenger's page, as a user opens it
        wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, 'button[title="Edit aliases"]'))).click()
        field = wait.until(
            ec.visibility_of_element_located((By.CSS_SELECTOR, '[role="dialog"] input[role="combobox"]'))
        )
        field.send_keys("champion")
        field.send_keys(Keys.ENTER)
        save = '[data-component-id="mlflow.edit-aliases-modal.save-button"]'
        wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, save))).click()
        wait.until(ec.invisibility_of_element_located((By.CSS_SELECTOR, '[role="dialog"]')))
        promoted_at = time.monotonic()
        # the audit record, previous-champion and the challenger alias gone with the promotion
        wait_for(lambda: aliases(client, NAME) == {"champion": new, "previous-champion": old}
                 and [r for r in history(client, NAME) if r["alias"] == "champion" and r["version"] == new],
                 "the listener's record of the UI promotion", timeout_s=30, log=stack.logs["ui"])  # fmt: skip
        audited_s = time.monotonic() - promoted_at
        move = history(client, NAME, HISTORY_TAG)[-1]
        assert (move["action"], move["champion"], move["replaced"], move["actor"], move["source"]) == (
            "promote", new, old, "mlflow-ui", "mlflow-ui")  # fmt: skip
        assert move["reason"] == "set in the MLflow UI" and move["violations"] == [] and move["at"].endswith("+00:00")
        record = [r for r in history(client, NAME) if r["alias"] == "champion"][-1]
        # recorded once, from the signed webhook or - when the machine is loaded and the delivery comes late - from
        # the listener's reconciliation a few seconds on; that webhooks arrive is shown below: `vilbert serve --poll 0`
        # only learns of the promotion from its own webhook
        assert (record["version"], record["previous"], record["source"]) == (new, old, "mlflow-ui")
        assert record["delivery_id"] and len([r for r in history(client, NAME) if r["alias"] == "champion"
                                              and r["version"] == new]) == 1  # fmt: skip
        tags = client.get_model_version(NAME, new).tags
        assert tags["champion.promoted_by"] == "mlflow-ui" and VIOLATIONS_TAG not in tags
        # the server answers with the new version, loaded because the webhook fired (serve polls never: --poll 0)
        answer = answered_by(stack, new)
        served_s = time.monotonic() - promoted_at
        assert answer["answer"] == expected_vqa(stack.folders[new], stack.store, world_png(), QUESTION)[0]
        # the model's page as the user sees it now: champion on the new version, previous-champion on the old one
        browser.get(f"{stack.uri}/#/models/{NAME}")
        for alias in ("champion", "previous-champion"):
            wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, f'div[title="{alias}"]')))
        # both versions' rows (their tags make them tall) with their aliases in one picture
        browser.execute_script("document.body.style.zoom = '0.5'; arguments[0].scrollIntoView({block: 'start'})",
                               browser.find_element(By.CSS_SELECTOR, 'div[title="champion"]'))  # fmt: skip
        for close in browser.find_elements(By.CSS_SELECTOR, '[data-component-id="mlflow.assistant.chat_panel.close"]'):
            close.click()  # MLflow's assistant panel (not part of this flow) off the picture
        shot = tmp_path / "promoted.png"
        browser.save_screenshot(str(shot))
        if os.environ.get("VILBERT_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["VILBERT_SCREENSHOT"])
    finally:
        browser.quit()
    print(f"UI promotion: audited after {audited_s:.1f} s, served after {served_s:.1f} s")
    # `vilbert rollback` undoes the UI promotion, and the server follows
    stack.cli("rollback", "--name", NAME, "--reason", "regression reported", "--actor", "tester")
    assert aliases(client, NAME) == {"champion": old}
    answered_by(stack, old)
    wait_for(lambda: [r for r in history(client, NAME) if r["alias"] == "champion"][-1]["source"] == "vilbert rollback",
             "the rollback's record", log=stack.logs["ui"])  # fmt: skip


def test_a_champion_that_cannot_load_is_flagged_and_never_takes_traffic(stack: Stack) -> None:
    """A version without a model behind it (registered by hand, no evaluation) made champion: the listener flags it,
    the server reports the failed load and keeps answering with the version it has."""
    client = MlflowClient(stack.uri, registry_uri=stack.uri)
    serving = stack.status()["version"]
    run = client.create_run(client.get_experiment_by_name("vilbert").experiment_id).info.run_id
    broken = str(client.create_model_version(NAME, f"runs:/{run}/no-model-here", run_id=run).version)
    client.set_model_version_tag(NAME, broken, "task", "vqa")  # it claims to serve VQA, so the load is tried
    client.set_registered_model_alias(NAME, "champion", broken)
    flagged = wait_for(lambda: client.get_model_version(NAME, broken).tags.get(VIOLATIONS_TAG), "the flag",
                       log=stack.logs["ui"])  # fmt: skip
    assert "has no evaluation" in flagged and "never passed the gate" in flagged
    assert aliases(client, NAME)["champion"] == broken  # flagged, not reverted
    failure = wait_for(lambda: stack.status()["last_error"], "the failed load", log=stack.logs["serve"])
    assert f"models:/{NAME}/{broken} cannot be loaded" in failure
    header, _, _ = stack.ask()
    assert header == serving and stack.status()["version"] == serving
    # the flag is set while the listener audits the change; its history entry is written right after
    records = wait_for(lambda: [r for r in history(client, NAME, ALIAS_HISTORY_TAG) if r["version"] == broken],
                       "the flagged change's history entry", log=stack.logs["ui"])  # fmt: skip
    assert records[-1]["violations"] == json.loads(flagged)
