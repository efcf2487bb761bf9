"""The trace view (dlmom trace, dlmom run --trace-html/--trace-png): what the page holds for a real trace of
tiny random models and for hand-made eval records, escaping, no network references, the PNG, the
command's errors, and the page in a real headless browser when one is installed."""
import html
import json
import os
import re
import shutil
import subprocess

import pytest

from dlmom import DLMoM, DLMoMConfig, Expert, cli
from dlmom.cli import printable
from dlmom.trace_html import render
from dlmom.trace_view import load
from tiny_models import llama

PROMPTS = ["What is 12 * 7?", "Add 3 to 5."]
EVIL = '<script>alert("x")</script> & \'q\''  # a token as a tokenizer may decode one
LINK = "see https://example.com/a?b=1&c=<2>"


@pytest.fixture(scope="module")
def results(tok):
    """Two experts (a preview and router scores), swir with a low threshold and a latent cap: preview,
    latent and explicit steps and switches with their reasons."""
    experts = [Expert(llama(tok, seed=s), tok, name=f"e{s}") for s in (0, 1)]
    config = DLMoMConfig(controller="swir", start_mode="explicit", block_size=2, entropy_threshold=0.0,
                         max_latent_steps=3, preview_tokens=3, top_m=2, top_k=5)
    res = DLMoM(experts, config=config).generate(PROMPTS, max_new_tokens=14)
    for r in res:
        assert {"preview", "latent", "explicit"} <= {t["mode"] for t in r.trace}, [t["mode"] for t in r.trace]
        assert any("switch" in t for t in r.trace) and len(r.route) == 2
    return res


@pytest.fixture(scope="module")
def run_json(results, tmp_path_factory):
    """The file `dlmom run --json` would print for ``results``."""
    path = tmp_path_factory.mktemp("run") / "run.json"
    path.write_text(json.dumps(results.to_dict(), indent=1))
    return str(path)


def step(i, mode, token, **extra):
    return {"step": i, "mode": mode, "entropy": 0.2 + 0.1 * i, "id": i, "token": token,
            "top": [[token, 0.6], [" 7", 0.3], ["&", 0.1]], "agreement": 0.5 if i != 1 else None, "merged": i != 1,
            "switches": int("switch" in extra), "bus_bytes": 40 if mode == "latent" else 4, **extra}


def record(item, method, trace, route=(), text="84"):
    return {"item": item, "method": method, "task": "jsonl", "correct": item == "a", "answer": "84", "reason": None,
            "error": None, "text": text, "tokens": 30, "wall_s": 0.5, "batch": 1, "settings": "s", "item_sha": "h",
            "usage": {"tokens": 30, "wall_s": 0.5}, "trace": list(trace), "route": list(route)}


@pytest.fixture
def eval_file(tmp_path):
    """A dlmom eval --out file: two dlmom records (one with a hostile token and a link), one baseline."""
    hostile = [step(0, "preview", "The"), step(1, "latent", EVIL, switch="to latent: entropy rising"),
               step(2, "latent", LINK), step(3, "explicit", " 84", switch="to explicit: latent cap 3 reached")]
    route = [{"expert": "solver<b>", "bits_per_byte": 1.25, "kept": True, "weight": 0.7},
             {"expert": "checker", "bits_per_byte": 2.5, "kept": False, "weight": 0.0}]
    lines = [record("a", "dlmom", hostile, route, text=EVIL),
             record("a", "single", [{"agent": "solver", "prompt": "What is 12 * 7?", "text": "It is 84."}]),
             record("b", "dlmom:latent", [step(0, "latent", " 8"), step(1, "explicit", "4")])]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return str(path)


def titles(page: str) -> list[str]:
    return [html.unescape(t) for t in re.findall(r"<title>(.*?)</title>", page, re.S)]


def test_page_of_a_real_run_shows_every_step(run_json, results):
    page = render(load(run_json))
    assert page.count("<svg") == len(results) == page.count('class="route"')
    sections = page.split('<section class="view"')[1:]
    assert len(sections) == len(results)
    for k, (r, section) in enumerate(zip(results, sections)):
        tips = titles(section.split("<svg")[1])
        assert len(tips) == len(r.trace) + sum("switch" in t for t in r.trace)  # a step's, a switch's
        for t in r.trace:
            tip = next(x for x in tips if x.startswith(f"step {t['step']} · {t['mode']} "))
            top = [printable(json.dumps(tok, ensure_ascii=False)) for tok, _ in t["top"]]
            assert all(f"{tok} {p:.3f}" in tip for tok, (_, p) in zip(top, t["top"])), (tip, t["top"])
            # the answer's token of the step carries the same tip, and lights the same step
            assert f'data-k="{k}-{t["step"]}" title="{html.escape(tip, quote=True)}"' in section
        switches = [t for t in r.trace if "switch" in t]
        reasons = [f"switch at step {t['step']}: {t['switch']}" for t in switches]
        assert [x for x in tips if x.startswith("switch at")] == reasons
        for x in r.route:
            assert f"<td>{x['expert']}</td><td>{x['bits_per_byte']:.3f}</td>" in page
    assert page.count('<g class="switch">') == sum("switch" in t for r in results for t in r.trace)
    latent_runs = page.count('class="shade m-latent"')
    assert latent_runs >= len(results)


def test_page_escapes_tokens_and_fetches_nothing(eval_file):
    page = render(load(eval_file))
    assert page.count("<script") == 1 and "<script>alert" not in page  # only the page's own script
    assert html.escape(EVIL, quote=True) in page and "solver&lt;b&gt;" in page
    # no reference to anything outside the file: the only URL is the user's own text, escaped
    assert not re.search(r"\b(src|href)\s*=|url\(|@import", page)
    outside = page.replace(html.escape(LINK, quote=True), "").replace(html.escape(json.dumps(LINK), quote=True), "")
    assert "http://" not in outside and "https://" not in outside


def test_eval_records_are_chosen_by_item_and_method(eval_file):
    assert [v.title for v in load(eval_file)] == ["item a · dlmom", "item b · dlmom:latent"]  # default: step traces
    assert [v.title for v in load(eval_file, item="b")] == ["item b · dlmom:latent"]
    single = load(eval_file, method="single")
    assert [v.title for v in single] == ["item a · single"] and not single[0].has_steps
    page = render(single)
    assert "<svg" not in page and "It is 84." in page and "No step trace" in page
    with pytest.raises(ValueError, match=r"argument --method: no record of method 'vote'.*methods dlmom, single"):
        load(eval_file, method="vote")
    with pytest.raises(ValueError, match=r"argument --item/--method: no record of item 'b' with method 'single'"):
        load(eval_file, item="b", method="single")


def test_merged_and_lead_alone_steps_are_marked(eval_file):
    page = render(load(eval_file, item="a"))
    assert "lead expert alone" in page and page.count('fill="#e15759"') == 1  # step 1 alone, the others merged
    assert "<dt>merged / lead alone</dt><dd>3 / 1</dd>" in page
    # the lead alone with the others deferred: no agreement recorded, a grey tick instead of a bar of 0
    assert page.count('class="noagree"') == 1 and "agreement not recorded (the others deferred)" in page
    assert "<dt>mean agreement</dt><dd>0.50 (1 steps not recorded)</dd>" in page


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_trace_command_writes_page_and_png(run_json, eval_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "view.html", tmp_path / "view.png"
    assert cli.main(["trace", run_json, "--html", str(out), "--png", str(png)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    width, height = png_size(png)
    assert width >= 800 and height >= 400
    assert cli.main(["trace", eval_file, "--method", "single", "--png", str(png)]) == 2  # nothing to draw
    assert "argument --png: no answer with a step trace" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["missing.json", "--html", "o.html"], "argument FILE: no such file: missing.json"),
    (["{bad}", "--html", "o.html"], "argument FILE: .* is not JSON, nor JSONL \\(line 1"),
    (["{notrace}", "--html", "o.html"], "argument FILE: no trace in"),
    (["{other}", "--html", "o.html"], "argument FILE: .* is JSON but neither"),
    (["{run}", "--html", "o.html", "--item", "a"], "argument --item: .* is what dlmom run --json prints"),
    (["{badmode}", "--html", "o.html"], "argument FILE: .*result 1, step record 1: mode must be one of"),
    (["{badstep}", "--html", "o.html"], "argument FILE: .*result 1, step record 0: step must be an integer"),
    (["{run}"], "argument --html/--png: give at least one output"),
    (["{run}", "--html", "no/such/dir/o.html"], "argument --html: no such folder"),
])
def test_trace_command_errors_are_one_line_naming_the_argument(args, message, run_json, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad").write_text("{not json\n")
    (tmp_path / "notrace").write_text(json.dumps({"results": [{"text": "hi", "trace": [], "route": [], "usage": {}}]}))
    (tmp_path / "other").write_text("[1, 2]")
    for name, trace in (("badmode", [step(0, "latent", "a"), step(1, "dreaming", "b")]),
                        ("badstep", [{**step(0, "latent", "a"), "step": '0" onmouseover="x'}])):
        (tmp_path / name).write_text(json.dumps({"results": [{"text": "a", "trace": trace}]}))
    files = {"{bad}": "bad", "{notrace}": "notrace", "{other}": "other", "{run}": run_json, "{badmode}": "badmode",
             "{badstep}": "badstep"}
    assert cli.main([files.get(a, a) for a in ["trace", *args]]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_png_without_matplotlib_says_how_to_get_it(run_json, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    assert cli.main(["trace", run_json, "--png", str(tmp_path / "v.png")]) == 2
    assert "argument --png: the PNG needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "v.png").exists()


def test_run_writes_its_trace_view(model_folder, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "run.html", tmp_path / "run.png"
    assert cli.main(["run", PROMPTS[0], "--experts", model_folder, "--max-new-tokens", "6", "--controller", "latent",
                     "--quiet", "--trace-html", str(out), "--trace-png", str(png)]) == 0
    page = out.read_text()
    assert page.count("<svg") == 1 and f"<h2>{html.escape(PROMPTS[0])}</h2>" in page
    assert page.count("class=\"hit\"") == 6 and png_size(png)[0] > 0
    assert cli.main(["run", "hi", "--experts", model_folder, "--trace-html", str(tmp_path / "no" / "x.html")]) == 2
    assert "argument --trace-html: no such folder" in capsys.readouterr().err


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on this machine (apt-get install chromium)")
def test_page_renders_in_a_headless_browser(run_json, results, tmp_path):
    image = pytest.importorskip("PIL.Image")
    page = tmp_path / "view.html"
    page.write_text(render(load(run_json)))
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
               "--window-size=1200,900"]
    shot = tmp_path / "shot.png"
    subprocess.run([*browser, f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=180)
    pixels = image.open(shot).convert("RGB")
    assert pixels.size == (1200, 900) and len(pixels.getcolors(maxcolors=1 << 24)) > 20  # drawn, not one blank colour
    # after the page's script: hover the first step's column, note the tooltip and what lit up
    hover = ("<script>document.querySelector('.chart .hit').dispatchEvent(new MouseEvent('mouseover', {bubbles: "
             "true})); document.body.setAttribute('data-hovered', document.getElementById('tip').textContent"
             ".split('\\n')[0] + '|' + document.querySelectorAll('.lit').length);</script></body>")
    page.write_text(page.read_text().replace("</body>", hover))
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True,
                         timeout=180).stdout
    # the page's script ran to its end: the tooltip element is there and native titles became data-tip
    body = dom.split("<body", 1)[1]
    first = results[0].trace[0]
    hovered = re.search(r'data-hovered="([^"]*)"', body).group(1)
    assert hovered.startswith(f"step 0 · {first['mode']} · entropy {first['entropy']:.3f}") and hovered.endswith("|2")
    assert 'data-view="ready"' in body and 'id="tip"' in body and "<title>" not in body and "title=" not in body
    steps = [t for r in results for t in r.trace]
    assert body.count("data-tip=") == 2 * len(steps) + sum("switch" in t for t in steps)  # token, column; switch
    assert os.path.getsize(shot) > 1000
