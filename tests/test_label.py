"""The label step: people rank sampled responses through a small web app; agreement and consensus from labels."""

import json
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from starlette.testclient import TestClient

from lightning_rlhf import ComparisonDataModule
from lightning_rlhf.cli import main
from lightning_rlhf.commands import label
from lightning_rlhf.commands.label.agreement import (
    agreement_report,
    borda,
    bradley_terry_consensus,
    kendall_tau,
    pairwise_agreement,
)
from lightning_rlhf.commands.label.app import make_app
from lightning_rlhf.commands.label.store import LabelStore, read_items
from lightning_rlhf.data.records import RecordError

XSS = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'
SAMPLES = [
    {"prompt": "Reverse: abc\n", "responses": ["cba", "abc", "cb"]},
    {"prompt": "Reverse: xy\n", "responses": ["yx", XSS]},
    {"prompt": [{"role": "user", "content": "Reverse: hi"}], "responses": ["ih", "", "i"]},  # '': EOS at once
]


@pytest.fixture
def samples(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in SAMPLES))
    return str(path)


def lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@contextmanager
def serving(store: LabelStore, token: str | None = None) -> Iterator[int]:
    """The app over ``store`` served by a real uvicorn on a free port (yielded) in a thread."""
    server = uvicorn.Server(uvicorn.Config(make_app(store, token), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        threading.Event().wait(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join()


# --- agreement and consensus: hand-computed ---------------------------------------------------------------------


def test_pairwise_agreement_and_kendall_tau_by_hand():
    """a = [0, 1, 2], b = [1, 0, 2]: pair (0,1) a says 0 better, b says 1 better -> disagree; (0,2) and (1,2)
    agree -> 2/3. τ: C = 2, D = 1, no ties -> (2 - 1) / √(3·3) = 1/3.
    a = [0, 0, 1], b = [0, 1, 2]: (0,1) a ties, b prefers 0 -> disagree; (0,2), (1,2) agree -> 2/3.
    τ-b: C = 2, D = 0, a ties one pair (n₁ = 1), b none -> 2 / √((3 - 1)·3) = 2/√6.
    The same ranking: 3/3, τ = 1; reversed: 0/3, τ = -1."""
    assert pairwise_agreement([0, 1, 2], [1, 0, 2]) == (2, 3)
    assert kendall_tau([0, 1, 2], [1, 0, 2]) == pytest.approx(1 / 3)
    assert pairwise_agreement([0, 0, 1], [0, 1, 2]) == (2, 3)
    assert kendall_tau([0, 0, 1], [0, 1, 2]) == pytest.approx(2 / 6**0.5)
    assert pairwise_agreement([0, 1, 2], [0, 1, 2]) == (3, 3) and kendall_tau([0, 1, 2], [0, 1, 2]) == 1
    assert pairwise_agreement([0, 1, 2], [2, 1, 0]) == (0, 3) and kendall_tau([0, 1, 2], [2, 1, 0]) == -1


def test_agreement_report_pools_pairs_overall_and_per_labeller():
    """Item 0: alice [0,1,2], bob [1,0,2], carol [0,1,2]; item 1: alice and bob both [0,1]; item 2: carol alone.
    Labeller pairs: item 0 alice-bob 2/3 (τ 1/3), alice-carol 3/3 (τ 1), bob-carol 2/3 (τ 1/3); item 1 alice-bob
    1/1 (τ 1); item 2 none. Overall (2+3+2+1)/(3+3+3+1) = 0.8, τ (1/3 + 1 + 1/3 + 1)/4 = 2/3.
    alice: (2+3+1)/(3+3+1) = 6/7, τ (1/3 + 1 + 1)/3 = 7/9; bob: (2+2+1)/7 = 5/7, τ (1/3 + 1/3 + 1)/3 = 5/9;
    carol: (3+2)/6 = 5/6, τ (1 + 1/3)/2 = 2/3."""
    labels = [
        {"item": 0, "labeller": "alice", "ranks": [0, 1, 2]},
        {"item": 0, "labeller": "bob", "ranks": [1, 0, 2]},
        {"item": 0, "labeller": "carol", "ranks": [0, 1, 2]},
        {"item": 1, "labeller": "alice", "ranks": [0, 1]},
        {"item": 1, "labeller": "bob", "ranks": [0, 1]},
        {"item": 2, "labeller": "carol", "ranks": [1, 0]},
    ]
    report = agreement_report(labels)
    assert (report["items"], report["labels"], report["items_with_several_labellers"]) == (3, 6, 2)
    assert report["pairwise_agreement"] == pytest.approx(0.8)
    assert report["kendall_tau"] == pytest.approx(2 / 3)
    expected = {"alice": (6 / 7, 7 / 9), "bob": (5 / 7, 5 / 9), "carol": (5 / 6, 2 / 3)}
    for name, (agreement, tau) in expected.items():
        row = report["per_labeller"][name]
        assert row["labels"] == 2
        assert (row["pairwise_agreement"], row["kendall_tau"]) == (pytest.approx(agreement), pytest.approx(tau))


def test_agreement_is_none_without_two_labellers_on_an_item():
    report = agreement_report(
        [{"item": 0, "labeller": "a", "ranks": [0, 1]}, {"item": 1, "labeller": "b", "ranks": [1, 0]}]
    )
    assert report["pairwise_agreement"] is None and report["kendall_tau"] is None


def test_borda_and_bradley_terry_consensus_by_hand():
    """[0,1,2], [1,0,2], [0,1,2]: response 0 is above 1 twice and above 2 three times -> 5 points; response 1 above 0
    once and above 2 three times -> 4; response 2 -> 0: Borda ranks [0, 1, 2]. Every pair was compared equally often,
    so Bradley-Terry orders by total wins the same way. With ties, [0,0,1] and [1,0,2]: response 0 gets ½ + 0 (vs 1)
    + 2 (vs 2) = 2.5, response 1 gets ½ + 1 + 2 = 3.5, response 2 gets 0 -> [1, 0, 2]. The half point decides
    [0,0,1] and [0,2,1]: response 0 gets ½ + 1 + 1 + 1 = 3.5, response 1 ½ + 1 = 1.5 (its tie with 0 and its win over
    2), response 2 gets 1 (over 1 in the second) -> [0, 1, 2]; without it 1 and 2 would tie. Opposite rankings of
    two responses tie: [0, 0]."""
    three = [[0, 1, 2], [1, 0, 2], [0, 1, 2]]
    assert borda(three) == [0, 1, 2] and bradley_terry_consensus(three) == [0, 1, 2]
    assert borda([[0, 0, 1], [1, 0, 2]]) == [1, 0, 2]
    assert borda([[0, 0, 1], [0, 2, 1]]) == [0, 1, 2]
    assert borda([[0, 1], [1, 0]]) == [0, 0] and bradley_terry_consensus([[0, 1], [1, 0]]) == [0, 0]


# --- the API ----------------------------------------------------------------------------------------------------


def test_labeller_ranks_every_item_once_and_each_label_is_a_line(samples, tmp_path):
    """Items come in order with progress; each accepted label is one complete line in the output (ties, flags and a
    demonstration kept); once all are done the labeller gets 204."""
    out = tmp_path / "labels.jsonl"
    client = TestClient(make_app(LabelStore(read_items(samples), out)))
    first = client.get("/api/next", params={"labeller": "alice"}).json()
    assert first == {"item": 0, **SAMPLES[0], "done": 0, "total": 3, "yours": 0}
    body = {"labeller": "alice", "item": 0, "ranks": [0, 1, 0], "flags": [{"response": 1, "reason": "not an answer"}]}
    answer = client.post("/api/label", json={**body, "demonstration": "cba"})
    assert answer.status_code == 200 and answer.json() == {"ok": True, "done": 1, "total": 3, "yours": 1}
    (written,) = lines(out)
    assert {k: written[k] for k in ("prompt", "responses", "ranks", "labeller", "item", "flags", "demonstration")} == {
        **SAMPLES[0],
        **body,
        "demonstration": "cba",
    }
    assert written["time"].endswith("+00:00")
    for item, ranks in ((1, [1, 0]), (2, [2, 0, 1])):
        assert client.get("/api/next", params={"labeller": "alice"}).json()["item"] == item
        assert client.post("/api/label", json={"labeller": "alice", "item": item, "ranks": ranks}).status_code == 200
    assert client.get("/api/next", params={"labeller": "alice"}).status_code == 204
    assert [(r["item"], r["ranks"]) for r in lines(out)] == [(0, [0, 1, 0]), (1, [1, 0]), (2, [2, 0, 1])]
    assert "flags" not in lines(out)[1] and "demonstration" not in lines(out)[1]


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{not json", 400, "not JSON"),
        ([0, 1], 400, "JSON object"),
        ({"labeller": "bob", "item": 0, "ranks": [0, 1, 2], "rank": [0]}, 400, "unknown fields ['rank']"),
        ({"item": 0, "ranks": [0, 1, 2]}, 400, "'labeller'"),
        ({"labeller": "bob", "item": 7, "ranks": [0, 1]}, 404, "no such item"),
        ({"labeller": "bob", "item": "0", "ranks": [0, 1, 2]}, 404, "'item'"),
        ({"labeller": "bob", "item": 0, "ranks": [0, 1]}, 422, "'ranks' has 2 entries but 'responses' has 3"),
        ({"labeller": "bob", "item": 0, "ranks": [1, 1, 1]}, 422, "all responses tie"),
        ({"labeller": "bob", "item": 0, "ranks": [0, 1, 3]}, 422, "0..2"),
        ({"labeller": "bob", "item": 0, "ranks": [0, 1, 2], "flags": [{"response": 3, "reason": "x"}]}, 422, "flags"),
        ({"labeller": "bob", "item": 0, "ranks": [0, 1, 2], "demonstration": 5}, 422, "demonstration"),
        ({"labeller": "alice", "item": 0, "ranks": [0, 1, 2]}, 409, "already labelled item 0"),
    ],
)
def test_bad_labels_get_a_4xx_with_a_message_and_write_nothing(samples, tmp_path, body, status, words):
    out = tmp_path / "labels.jsonl"
    client = TestClient(make_app(LabelStore(read_items(samples), out)))
    assert client.post("/api/label", json={"labeller": "alice", "item": 0, "ranks": [0, 1, 2]}).status_code == 200
    before = out.read_bytes()
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = client.post("/api/label", content=content, headers={"Content-Type": "application/json"})
    assert answer.status_code == status and words in answer.json()["error"]
    assert out.read_bytes() == before


def test_each_item_goes_to_n_labellers_and_never_twice_to_one(samples, tmp_path):
    """N = 2: alice and bob are both given item 0 (one lease each, two wanted); carol, arriving while they work, gets
    item 1. When alice is done with everything, no item has gone to her twice and each item has had two labellers."""
    store = LabelStore(read_items(samples), tmp_path / "labels.jsonl", labellers_per_item=2)
    assert [store.next_item(name)["item"] for name in ("alice", "bob", "carol")] == [0, 0, 1]
    assert store.next_item("alice")["item"] == 0  # asked again before labelling: the same item
    seen: dict[str, list[int]] = {"alice": [], "bob": [], "carol": []}
    working = set(seen)
    while working:
        for name in sorted(working):
            item = store.next_item(name)
            if item is None:
                working.discard(name)
                continue
            assert item["item"] not in seen[name]
            seen[name].append(item["item"])
            store.add({"labeller": name, "item": item["item"], "ranks": list(range(len(item["responses"])))})
    assert [len(names) for names in store.labelled_by] == [2, 2, 2]
    assert store.progress("x")["done"] == store.progress("x")["total"] == 6


def test_restart_resumes_from_the_file_losing_nothing_and_serving_nothing_twice(samples, tmp_path):
    """Labels survive a restart; alice continues at item 1 and may not label item 0 again; a torn last line (a crash
    mid-write, never acknowledged) is dropped; an output that no longer matches the input is refused by line."""
    out = tmp_path / "labels.jsonl"
    store = LabelStore(read_items(samples), out, labellers_per_item=2)
    store.add({"labeller": "alice", "item": 0, "ranks": [0, 1, 2]})
    store.add({"labeller": "bob", "item": 0, "ranks": [2, 1, 0]})
    store.close()
    with out.open("a") as torn:
        torn.write('{"prompt": "Reverse: xy\\n", "respon')
    resumed = LabelStore(read_items(samples), out, labellers_per_item=2)
    assert [r["labeller"] for r in lines(out)] == ["alice", "bob"]
    assert resumed.next_item("alice")["item"] == 1 and resumed.progress("alice")["done"] == 2
    with pytest.raises(Exception, match="already labelled item 0"):
        resumed.add({"labeller": "alice", "item": 0, "ranks": [0, 1, 2]})
    resumed.add({"labeller": "alice", "item": 1, "ranks": [0, 1]})
    assert [(r["labeller"], r["item"]) for r in lines(out)] == [("alice", 0), ("bob", 0), ("alice", 1)]
    resumed.close()

    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps({**r, "responses": r["responses"][::-1]}) + "\n" for r in SAMPLES))
    with pytest.raises(RecordError, match=r"labels.jsonl line 1: item 0 is not the input's item 0"):
        LabelStore(read_items(str(changed)), out)


def test_concurrent_posts_of_the_same_label_write_it_once(samples, tmp_path):
    """Eight threads post alice's label of item 0 at once: one 200, seven 409, one line."""
    out = tmp_path / "labels.jsonl"
    store = LabelStore(read_items(samples), out)
    start, outcomes = threading.Barrier(8), []

    def post():
        start.wait()
        try:
            store.add({"labeller": "alice", "item": 0, "ranks": [0, 1, 2]})
            outcomes.append(200)
        except Exception as err:  # noqa: BLE001
            outcomes.append(err.status)

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == [200] + [409] * 7 and len(lines(out)) == 1


def test_eight_labellers_at_once_over_http_lose_and_duplicate_nothing(tmp_path):
    """A real uvicorn server; 25 items wanted by 8 labellers each: 8 threads ask and post until told 204. All 200
    labels are in the file, each (item, labeller) once, and the file resumes to complete."""
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"prompt": f"p{i}", "responses": ["a", "b"]}) + "\n" for i in range(25)))
    out = tmp_path / "labels.jsonl"
    store = LabelStore(read_items(str(samples)), out, labellers_per_item=8)
    accepted, failures = [], []

    def label(name: str):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(26):  # 25 items for each, then 204 (bounded: a broken server must not hang the test)
                item = client.get("/api/next", params={"labeller": name})
                if item.status_code == 204:
                    return
                body = {"labeller": name, "item": item.json()["item"], "ranks": [0, 1]}
                answer = client.post("/api/label", json=body)
                (accepted if answer.status_code == 200 else failures).append((name, body["item"]))
            failures.append((name, "never told 204"))

    with serving(store) as port:
        threads = [threading.Thread(target=label, args=(f"labeller{n}",)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    store.close()
    written = {(r["labeller"], r["item"]) for r in lines(out)}
    assert failures == [] and len(accepted) == len(lines(out)) == len(written) == 200
    assert written == {(f"labeller{n}", i) for n in range(8) for i in range(25)}
    assert LabelStore(read_items(str(samples)), out, labellers_per_item=8).next_item("labeller0") is None


def test_page_and_its_script_show_model_output_only_as_text(samples, tmp_path):
    """The page is served with its script; the script never parses model output as HTML (only textContent), and
    the Content-Security-Policy forbids inline scripts, so an injected <script> would not run either way."""
    client = TestClient(make_app(LabelStore(read_items(samples), tmp_path / "labels.jsonl")))
    page = client.get("/")
    assert page.status_code == 200 and '<script src="/static/label.js"' in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    script = client.get("/static/label.js").text
    assert 'text.textContent = shown || "(empty response)"' in script and "const shown = asText(response)" in script
    assert not any(sink in script for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"))


def test_another_host_requires_a_token(samples, tmp_path, monkeypatch, capsys):
    """--host 0.0.0.0 without --token: a token is made up and printed, and the API refuses requests without it."""
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app, **options))
    main(["label", "--input", samples, "--output", str(tmp_path / "labels.jsonl"), "--host", "0.0.0.0"])
    token = capsys.readouterr().out.split("#token=")[1].split()[0]
    client = TestClient(served["app"])
    assert served["host"] == "0.0.0.0" and len(token) >= 16
    assert client.get("/api/next", params={"labeller": "a"}).status_code == 401
    authorised = client.get("/api/next", params={"labeller": "a"}, headers={"Authorization": f"Bearer {token}"})
    assert authorised.status_code == 200 and client.get("/").status_code == 200


@pytest.mark.parametrize(
    "option",
    [
        ["--kto", "kto.jsonl"],
        ["--demonstrations", "better.jsonl"],
        ["--report", "agree.json"],
        ["--consensus", "borda"],
    ],
    ids=["kto", "demonstrations", "report", "consensus"],
)
def test_aggregation_options_without_aggregate_are_refused_naming_the_option(
    samples, tmp_path, monkeypatch, capsys, option
):
    """``--input … --kto FILE`` (or ``--demonstrations``, ``--report``, ``--consensus``) is a usage error naming the
    option and saying to add ``--aggregate``, before anything is served; the same option with ``--aggregate`` is
    taken, its file written. Catches: the option silently ignored while serving (the server would start and FILE
    never be written), one of the four left out of the check, the check refusing them with ``--aggregate`` too."""
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.append(app))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["label", "--input", samples, "--output", "labels.jsonl", *option])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{option[0]} only means something with --aggregate" in error, error
    assert "add --aggregate LABELS" in error and not served and not (tmp_path / "labels.jsonl").exists()
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({**SAMPLES[0], "ranks": [0, 1, 2], "labeller": "a", "item": 0, "demonstration": "x"}))
    main(["label", "--aggregate", str(labels), "--output", "comparisons.jsonl", *option])
    assert (tmp_path / "comparisons.jsonl").exists()
    if option[0] != "--consensus":
        assert (tmp_path / option[1]).exists()


# --- from labels to training data -------------------------------------------------------------------------------


def test_labels_and_their_aggregate_feed_the_reward_models_datamodule(samples, tmp_path, tiny_model_dir):
    """Two labellers rank all three items through the API; the labels file itself, and the Borda consensus the
    aggregate writes (one per item; item 1 they ranked oppositely, so it ties and is left out), are comparison
    records the ComparisonDataModule reads. The agreement file holds the hand-computed numbers: item 0 [0,1,2] vs
    [1,0,2] 2/3; item 1 [0,1] vs [1,0] 0/1; item 2 [0,1,2] vs [0,1,2] 3/3 -> 5/7; τ (1/3 - 1 + 1)/3 = 1/9."""
    out = tmp_path / "labels.jsonl"
    client = TestClient(make_app(LabelStore(read_items(samples), out, labellers_per_item=2)))
    ranks = {"alice": [[0, 1, 2], [0, 1], [0, 1, 2]], "bob": [[1, 0, 2], [1, 0], [0, 1, 2]]}
    for name, rankings in ranks.items():
        for item, item_ranks in enumerate(rankings):
            body = {"labeller": name, "item": item, "ranks": item_ranks}
            if name == "bob" and item == 2:
                body["demonstration"] = "ih!"
            assert client.post("/api/label", json=body).status_code == 200
    comparisons, demonstrations = tmp_path / "comparisons.jsonl", tmp_path / "demonstrations.jsonl"
    report = label.main(
        [
            "--aggregate",
            str(out),
            "--output",
            str(comparisons),
            "--consensus",
            "borda",
            "--demonstrations",
            str(demonstrations),
        ]
    )
    assert report["pairwise_agreement"] == pytest.approx(5 / 7) and report["kendall_tau"] == pytest.approx(1 / 9)
    assert json.loads((tmp_path / "comparisons.agreement.json").read_text()) == report
    assert [(r["item"], r["ranks"], r["labellers"]) for r in lines(comparisons)] == [
        (0, [0, 0, 1], ["alice", "bob"]),
        (2, [0, 1, 2], ["alice", "bob"]),
    ]
    assert lines(demonstrations) == [{"prompt": SAMPLES[2]["prompt"], "response": "ih!", "labeller": "bob", "item": 2}]
    for path, count in ((out, 6), (comparisons, 2)):
        data = ComparisonDataModule(train_path=str(path), val_fraction=0, tokenizer_name_or_path=tiny_model_dir)
        data.setup("fit")
        assert len(data.train_examples) == count


# --- in a real browser -----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")), reason="needs chromium")
def test_a_labeller_ranks_three_items_in_headless_chromium(samples, tmp_path):
    """Headless Chromium, keyboard only where a person would use it: alice ranks item 0 with a tie (1, 2, 1), rates
    responses 1 and 3 at 6 and 2 (response 2 left unrated: null) and flags response 2, submitting with Enter; sees
    item 1's XSS response as its literal text (no <img>, no script run) and ranks it (2, 1) tabbing past the
    rating and flag, submitting with Ctrl+Enter; ranks the chat item (3, 1, 2) with a better answer, clicking
    Submit (its empty response shown as "(empty response)"); then is told nothing is left. The file holds exactly
    those three records. Catches the page not sending its ratings, or sending an unset one as other than null."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    out = tmp_path / "labels.jsonl"
    store = LabelStore(read_items(samples), out)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        with serving(store, token="s3cret") as port:
            browser.get(f"http://127.0.0.1:{port}/#token=s3cret")
            wait = WebDriverWait(browser, 20)
            element = browser.find_element

            def on_item(item: int) -> None:
                wait.until(lambda b: f"Item {item}." in element(By.ID, "progress").text)

            element(By.ID, "name").send_keys("alice", Keys.ENTER)
            on_item(0)
            assert element(By.ID, "progress").text == "Done 0 / 3 labels (yours: 0). Item 0."
            Select(element(By.ID, "flag-1")).select_by_visible_text("not an answer")
            Select(element(By.ID, "rating-0")).select_by_visible_text("6")
            Select(element(By.ID, "rating-2")).select_by_visible_text("2")
            element(By.ID, "rank-1").send_keys("2")
            element(By.ID, "rank-2").send_keys("1")
            element(By.ID, "rank-0").send_keys("1", Keys.ENTER)

            on_item(1)
            texts = [pre.text for pre in browser.find_elements(By.CSS_SELECTOR, "#responses pre")]
            assert texts == ["yx", XSS]
            assert browser.find_elements(By.CSS_SELECTOR, "#responses img, #responses script") == []
            assert browser.title != "pwned"
            element(By.ID, "rank-0").send_keys("2", Keys.TAB, Keys.TAB, Keys.TAB, "1", Keys.CONTROL, Keys.ENTER)

            on_item(2)
            assert element(By.ID, "prompt").text == "user: Reverse: hi"
            texts = [pre.text for pre in browser.find_elements(By.CSS_SELECTOR, "#responses pre")]
            assert texts == ["ih", "(empty response)", "i"]  # an empty response is shown as one, to be ranked
            for i, entered in enumerate("312"):
                element(By.ID, f"rank-{i}").send_keys(entered)
            element(By.ID, "demonstration").send_keys("ih")
            element(By.ID, "submit").click()
            wait.until(lambda b: "Nothing left" in element(By.ID, "message").text)
    finally:
        browser.quit()
        store.close()
    assert [{k: v for k, v in r.items() if k != "time"} for r in lines(out)] == [
        {
            **SAMPLES[0],
            "ranks": [0, 1, 0],
            "labeller": "alice",
            "item": 0,
            "ratings": [6, None, 2],
            "flags": [{"response": 1, "reason": "not an answer"}],
        },
        {**SAMPLES[1], "ranks": [1, 0], "labeller": "alice", "item": 1},
        {**SAMPLES[2], "ranks": [2, 0, 1], "labeller": "alice", "item": 2, "demonstration": "ih"},
    ]


@pytest.mark.parametrize(
    "change, words",
    [
        ({"labeller": None}, "'labeller'"),
        ({"item": -1}, "'item'"),
        ({"ranks": [0, 0, 0]}, "all responses tie"),
    ],
)
def test_aggregate_refuses_a_bad_label_naming_file_line_and_field(tmp_path, change, words):
    labels = tmp_path / "labels.jsonl"
    good = {**SAMPLES[0], "ranks": [0, 1, 2], "labeller": "alice", "item": 0}
    labels.write_text(json.dumps(good) + "\n" + json.dumps({**good, "labeller": "bob", **change}) + "\n")
    with pytest.raises(RecordError, match=rf"labels.jsonl line 2: .*{words}"):
        label.main(["--aggregate", str(labels), "--output", str(tmp_path / "comparisons.jsonl")])
    assert not (tmp_path / "comparisons.jsonl").exists()
