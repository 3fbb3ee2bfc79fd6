"""The serving application, live: real local Ray + Serve (started once for this module), a tiny
base, a SQLite registry with a small organisation, and the official ``openai`` client.

Every answer is compared with what the engine computes for that model alone (greedy), in this
process, from the same store objects.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request

import httpx
import openai
import pytest
import ray
from _tiny import one_thread
from conftest import free_port
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from ray import serve
from test_serve_parts import ORG, World, make_world

from fleet.lora import AdapterWeights, generate, prompt_logprobs
from fleet.serve.app import start
from fleet.serve.ingress import SERVED_BY
from fleet.serve.metrics import ALLOWED_TAGS, SPECS
from fleet.serve.runtime import build_runtime, encode_chat, encode_prompt

pytestmark = [pytest.mark.ray, pytest.mark.slow]
_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


class Reference:
    """The engine in this process: what each model answers alone."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.rt = build_runtime(world.cfg, slots=32)
        self.tok = self.rt.tokenizer

    def slots(self, model_id: str) -> tuple[list[int], str]:
        stack = self.world.fleet.registry.active_stack(model_id)
        out = []
        for e in stack.entries:
            if self.rt.engine.slot(e.key) is None:
                files = self.world.fleet.store.read_version(e.uri, e.sha256)
                self.rt.engine.load(e.key, AdapterWeights.from_bytes(files.config, files.weights))
            out.append(self.rt.engine.slot(e.key))
        return out or [-1], stack.served_by

    def complete(self, model_id: str, ids: list[int], n: int, slots: list[int] | None = None) -> str:
        slots = slots or self.slots(model_id)[0]
        return generate(self.rt.engine, self.tok, [ids], [slots], max_new_tokens=n)[0].text

    def text(self, model_id: str, prompt: str, n: int) -> str:
        return self.complete(model_id, encode_prompt(self.tok, prompt), n)


DASHBOARD: dict[str, str] = {}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    world = make_world(
        tmp_path_factory.mktemp("serve-app"), port=free_port(), company_rate_limits={"slowco": 0.01}
    )
    metrics_port = free_port()
    ctx = ray.init(
        num_cpus=4,
        include_dashboard=True,  # fleet status reads the Serve application through its REST API
        dashboard_port=free_port(),
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    DASHBOARD["url"] = f"http://{ctx.dashboard_url}"
    try:
        url = start(world.cfg)
        yield world, url, metrics_port
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ref(app) -> Reference:
    return Reference(app[0])


def client(app, company: str = "acme", key: str | None = None) -> openai.OpenAI:
    world, url, _ = app
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key or world.keys[company], max_retries=0, timeout=120)


def async_client(app, company: str = "acme") -> openai.AsyncOpenAI:
    world, url, _ = app
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=world.keys[company], max_retries=0, timeout=120)


def replica_stats() -> dict:
    return serve.get_deployment_handle("FleetModel", "fleet").stats.remote().result()


# ---------------------------------------------------------------------- the API
def test_models_lists_only_the_callers_company(app):
    acme = sorted(m.id for m in client(app).models.list().data)
    assert acme == sorted(m for m in ORG if m.split("/")[0] == "acme")
    assert sorted(m.id for m in client(app, "globex").models.list().data) == ["globex", "globex/labs"]
    assert client(app).models.retrieve("acme/ops").owned_by == "acme"
    with pytest.raises(openai.NotFoundError):
        client(app).models.retrieve("globex/labs")


CASES = [  # model, the level that answers (individual → team → company → base)
    ("acme/search/dana", "acme/search/dana@v1"),
    ("acme/search/lee", "acme/search@v1"),  # no individual version: the team's stack answers
    ("acme/ops", "acme@v1"),  # no team version: the company's
    ("acme/ops/kim", "acme/ops/kim@v1"),  # company + individual, no team level
    ("acme", "acme@v1"),
]


def test_completions_equal_the_engine_alone_and_name_the_stack_that_served(app, ref):
    texts = set()
    for model, served_by in CASES:
        raw = client(app).completions.with_raw_response.create(
            model=model, prompt="The fleet", max_tokens=10, temperature=0
        )
        out = raw.parse()
        assert raw.headers[SERVED_BY] == served_by
        assert out.choices[0].text == ref.text(model, "The fleet", 10)
        assert out.usage.prompt_tokens == len(encode_prompt(ref.tok, "The fleet"))
        assert out.usage.completion_tokens == 10 or out.choices[0].finish_reason == "stop"
        texts.add(out.choices[0].text)
    assert len(texts) >= 4  # the adapters change what the base says
    raw = client(app, "baseco").completions.with_raw_response.create(
        model="baseco", prompt="The fleet", max_tokens=10, temperature=0
    )
    assert raw.headers[SERVED_BY] == "base"
    assert raw.parse().choices[0].text == ref.complete(
        "baseco", encode_prompt(ref.tok, "The fleet"), 10, [-1]
    )


def test_mixed_concurrent_requests_each_get_their_own_models_answer(app, ref):
    models = [m for m, _ in CASES]
    jobs = [(models[i % len(models)], f"prompt {i} " + "x" * (i % 5), 4 + (i * 7) % 20) for i in range(30)]

    async def go():
        acme, base = async_client(app), async_client(app, "baseco")
        calls = [
            acme.completions.create(model=m, prompt=pr, max_tokens=n, temperature=0) for m, pr, n in jobs
        ]
        calls += [
            base.completions.create(model="baseco", prompt=f"b{i}", max_tokens=6, temperature=0)
            for i in range(4)
        ]
        return await asyncio.gather(*calls)

    outs = asyncio.run(go())
    for (m, pr, n), out in zip(jobs, outs, strict=False):
        assert out.choices[0].text == ref.text(m, pr, n), (m, pr, n)
    for i, out in enumerate(outs[len(jobs) :]):
        assert out.choices[0].text == ref.complete("baseco", encode_prompt(ref.tok, f"b{i}"), 6, [-1])
    assert replica_stats()["max_rows_seen"] >= 2  # they shared decode steps


def test_streaming_sends_the_same_text_in_pieces(app, ref):
    chunks = list(
        client(app).completions.create(
            model="acme/search/dana", prompt="Stream", max_tokens=20, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.text("acme/search/dana", "Stream", 20)
    assert chunks[-2].choices[0].finish_reason in ("length", "stop")
    assert chunks[-1].usage.prompt_tokens == len(encode_prompt(ref.tok, "Stream"))
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1
    with client(app).completions.with_streaming_response.create(
        model="acme/ops/kim", prompt="Stream", max_tokens=5, temperature=0, stream=True
    ) as resp:
        assert resp.headers[SERVED_BY] == "acme/ops/kim@v1"
        assert resp.headers["content-type"].startswith("text/event-stream")


def test_chat_goes_through_the_base_chat_template_streamed_or_not(app, ref):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}]
    ids = encode_chat(ref.tok, messages)
    expected = ref.complete("acme/search/dana", ids, 12)
    out = client(app).chat.completions.create(
        model="acme/search/dana", messages=messages, max_tokens=12, temperature=0
    )
    assert out.choices[0].message.content == expected and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(ids)
    stream = client(app).chat.completions.create(
        model="acme/search/dana", messages=messages, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_echo_with_logprobs_scores_the_prompt_like_the_engine(app, ref):
    prompt = "Score this"
    ids = encode_prompt(ref.tok, prompt)
    out = client(app).completions.create(
        model="acme/ops/kim", prompt=prompt, max_tokens=0, echo=True, logprobs=3, temperature=0
    )
    choice = out.choices[0]
    assert choice.text == prompt
    slots, _ = ref.slots("acme/ops/kim")
    want = prompt_logprobs(ref.rt.engine, [ids], [slots], top_k=3)[0]
    assert len(choice.logprobs.tokens) == len(ids)
    assert choice.logprobs.token_logprobs[0] is None
    got = choice.logprobs.token_logprobs[1:]
    assert got == pytest.approx([w["logprob"] for w in want[1:]], abs=1e-4)
    assert all(len(top) == 3 for top in choice.logprobs.top_logprobs[1:])
    gen = client(app).completions.create(
        model="acme/ops/kim", prompt=prompt, max_tokens=5, logprobs=1, temperature=0
    )
    eos = gen.choices[0].finish_reason == "stop"  # the EOS counts as generated but is not returned
    assert len(gen.choices[0].logprobs.tokens) == gen.usage.completion_tokens - eos
    assert all(lp <= 0 for lp in gen.choices[0].logprobs.token_logprobs)


def test_errors_raise_the_clients_matching_exceptions(app):
    acme = client(app)
    with pytest.raises(openai.AuthenticationError):
        client(app, key="fleet_0000_wrong").models.list()
    for model in ("globex/labs", "acme/nobody", "Not An Id"):
        with pytest.raises(openai.NotFoundError) as err:
            acme.completions.create(model=model, prompt="x", max_tokens=1)
        assert err.value.code == "model_not_found"
    for bad in ({"n": 2}, {"temperature": 5}, {"max_tokens": 1000}, {"stop": ["a"] * 5}):
        with pytest.raises(openai.BadRequestError):
            acme.completions.create(model="acme", prompt="x", **{"max_tokens": 1, **bad})
    with pytest.raises(openai.BadRequestError):
        acme.chat.completions.create(model="acme", messages=[], max_tokens=1)
    with pytest.raises(openai.APIStatusError) as err:
        acme.completions.create(model="acme", prompt="x" * 400, max_tokens=1)
    assert err.value.status_code == 413 and err.value.code == "context_length_exceeded"
    slow = client(app, "slowco")
    with pytest.raises(openai.NotFoundError):
        slow.completions.create(model="slowco/none", prompt="x", max_tokens=1)  # spends the one-request burst
    with pytest.raises(openai.RateLimitError) as err:
        slow.completions.create(model="slowco", prompt="x", max_tokens=1)
    assert int(err.value.response.headers["retry-after"]) >= 1


def test_no_key_malformed_json_and_unknown_routes_use_openais_error_shape(app):
    world, url, _ = app
    with httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("/v1/completions", json={"model": "acme", "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        auth = {"Authorization": f"Bearer {world.keys['acme']}"}
        r = http.post(
            "/v1/completions", content=b"{not json", headers={**auth, "content-type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = http.get("/v1/nothing-here", headers=auth)
        assert r.status_code == 404 and "error" in r.json()
        assert http.get("/healthz").json()["status"] == "ok"
        schema = http.get("/openapi.json").json()
        body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"][
            "schema"
        ]
        assert body["$ref"].rsplit("/", 1)[-1] in schema["components"]["schemas"]


# ---------------------------------------------------------------------- versions and faults
def test_a_promoted_version_is_served_on_the_next_request(app, ref):
    world = app[0]
    before = client(app).completions.with_raw_response.create(
        model="acme/search/lee", prompt="Hot", max_tokens=8, temperature=0
    )
    assert before.headers[SERVED_BY] == "acme/search@v1"
    world.publish(["acme/search/lee"], seed=300)  # lee's first version, active at once
    after = client(app).completions.with_raw_response.create(
        model="acme/search/lee", prompt="Hot", max_tokens=8, temperature=0
    )
    assert after.headers[SERVED_BY] == "acme/search/lee@v1"
    assert after.parse().choices[0].text == ref.text("acme/search/lee", "Hot", 8)


def test_a_corrupt_object_is_never_served_the_previous_version_answers(app, ref):
    world = app[0]
    v1_slots, _ = ref.slots("acme/ops/kim")  # the reference holds v1 before v2 exists
    world.publish(["acme/ops/kim"], seed=400)  # v2 active, v1 retired
    path = world.object_path("acme/ops/kim", 2)
    path.write_bytes(b"\0" * 64 + path.read_bytes()[64:])
    raw = client(app).completions.with_raw_response.create(
        model="acme/ops/kim", prompt="Safe", max_tokens=8, temperature=0
    )
    assert raw.headers[SERVED_BY] == "acme/ops/kim@v1"
    assert raw.parse().choices[0].text == ref.complete(
        "acme/ops/kim", encode_prompt(ref.tok, "Safe"), 8, v1_slots
    )
    stats = replica_stats()
    assert stats["failed_loads"] == {"corrupt": 1} and "acme/ops/kim@v2" not in stats["resident"]


def test_adapters_shared_by_stacks_are_loaded_once_per_replica(app):
    stats = replica_stats()
    assert stats["evictions"] == 0
    assert stats["loads"] == len(stats["resident"])  # every resident adapter was read exactly once
    assert stats["hits"] > 5 * stats["loads"]


# ---------------------------------------------------------------------- metrics
def test_metrics_are_tagged_by_bounded_values_never_by_model_id(app):
    assert all(set(spec.tag_keys) <= ALLOWED_TAGS for spec in SPECS.values())
    _, _, port = app
    ray_labels = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId"}
    deadline, lines = time.time() + 60, []
    while time.time() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        lines = [line for line in text.splitlines() if line and not line.startswith("#")]
        names = {
            m.group(1)
            for line in lines
            if (m := re.match(r"ray_(fleet_serve_\w+?)(_total|_bucket|_sum|_count)?\{", line))
        }
        if {"fleet_serve_requests", "fleet_serve_batch_size", "fleet_serve_adapter_cache_hits"} <= names:
            break
        time.sleep(1)
    ours = [line for line in lines if line.startswith("ray_fleet_serve_")]
    assert ours, "no fleet_serve_* series exported"
    for line in ours:
        labels = _labels(line)
        extra = {k for k in labels if not k.startswith("otel_")} - ALLOWED_TAGS - ray_labels - {"le"}
        assert not extra, line
    # Nothing exported by any component (Ray Serve's own multiplexing gauge included) names a model.
    tenants = re.compile("|".join(re.escape(m) for m in sorted(ORG, key=len, reverse=True)))
    for line in lines:
        for value in _labels(line).values():
            assert "@v" not in value and not any(
                tenants.fullmatch(part) for part in re.split(r"[+@]", value)
            ), line
    statuses = {_labels(s).get("status") for s in ours if s.startswith("ray_fleet_serve_requests")}
    assert {"200", "404"} <= statuses


def _labels(line: str) -> dict[str, str]:
    if "{" not in line:
        return {}
    return dict(re.findall(r'(\w+)="([^"]*)"', line.split("{", 1)[1].rsplit("}", 1)[0]))


# ---------------------------------------------------------------------- fuzzing
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_text = st.text(max_size=40)
_model = st.sampled_from(["acme", "acme/search/dana", "acme/ops/kim", "acme/search/lee", "baseco"])
_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "developer"]), "content": _text}
    ),
    min_size=1,
    max_size=3,
)
# Values the API accepts, per field; a body is built from these, then some fields are broken.
_good = {
    "model": _model,
    "prompt": _text | st.lists(st.integers(0, 263), min_size=1, max_size=8),
    "messages": _messages,
    "max_tokens": st.integers(1, 24),
    "temperature": st.sampled_from([0.0, 0.0, 0.7, 2.0]),
    "top_p": st.floats(0.01, 1.0),
    "stream": st.booleans(),
    "stop": st.text(min_size=1, max_size=2) | st.lists(st.text(min_size=1, max_size=2), max_size=4),
    "echo": st.booleans(),
    "seed": st.integers(0, 2**40),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
# Values it must refuse (or answer 404/413 for), never crash on.
_bad = {
    "model": st.sampled_from(["globex/labs", "ACME", "", "a/b/c/d", "acme/nobody"]) | _json,
    "prompt": st.text(min_size=300, max_size=400) | st.lists(st.integers(-5, 10**6), max_size=4) | _json,
    "messages": st.lists(st.fixed_dictionaries({"role": st.text(max_size=5), "content": _json})) | _json,
    "max_tokens": st.integers(-3, 0) | st.integers(49, 10**9) | _json,
    "temperature": st.floats(allow_nan=True) | _json,
    "top_p": st.floats(-1.0, 0.0) | st.floats(1.0001, 5.0) | _json,
    "n": st.integers(-2, 5) | _json,
    "stream": _json,
    "stop": st.lists(st.text(max_size=3), min_size=5, max_size=6) | st.just("") | _json,
    "logprobs": st.integers(-3, 9) | _json,
    "seed": st.integers(2**63, 2**70) | _json,
    "stream_options": _json,
    "presence_penalty": st.floats(0.1, 2.0),
    "logit_bias": st.dictionaries(st.text(max_size=3), st.floats(-5, 5), min_size=1, max_size=2),
    "suffix": st.text(min_size=1, max_size=4),
}


@st.composite
def _bodies(draw, chat: bool):
    shape = draw(st.sampled_from(["valid", "valid", "one_broken", "one_broken", "garbage"]))
    if shape == "garbage":
        return draw(_json | st.binary(max_size=64))
    fields = ["model", "messages" if chat else "prompt"]
    optional = [k for k in _good if k not in ("model", "prompt", "messages")]
    fields += draw(st.lists(st.sampled_from(optional), unique=True, max_size=5))
    body = {k: draw(_good[k]) for k in fields}
    if not chat and "logprobs" not in body and draw(st.booleans()):
        body.update(logprobs=draw(st.integers(0, 5)), stream=False)
    if shape == "one_broken":
        key = draw(st.sampled_from(sorted(_bad)))
        if key in ("messages", "prompt"):
            key = "messages" if chat else "prompt"
        body[key] = draw(_bad[key])
    return body


_requests = st.sampled_from(["/v1/completions", "/v1/chat/completions"]).flatmap(
    lambda path: st.tuples(st.just(path), _bodies(path.endswith("chat/completions")))
)


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=_requests, auth=st.sampled_from(["acme", "acme", "acme", "baseco", "none", "garbage"]))
def test_fuzzed_requests_get_clean_answers_never_a_500(app, request, auth):
    world, url, _ = app
    path, body = request
    headers = {"content-type": "application/json"}
    if auth in world.keys:
        headers["Authorization"] = f"Bearer {world.keys[auth]}"
    elif auth == "garbage":
        headers["Authorization"] = "Bearer fleet_garbage_garbage"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(base_url=url, timeout=120) as http:
        r = http.post(path, content=content, headers=headers)
    event(f"status {r.status_code}")
    assert r.status_code in (200, 400, 401, 404, 413), (r.status_code, r.text[:300])
    if r.status_code != 200:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["type"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and all('"error"' not in e[:12] for e in events)
    else:
        assert r.json()["choices"] and r.headers[SERVED_BY]


# ---------------------------------------------------------------------- operators' view
def test_status_reports_the_api_and_the_serve_application(app):
    from urllib.parse import urlparse

    from fleet.status import serving_summary

    world, url, _ = app
    cfg = world.cfg.model_copy(deep=True)
    cfg.serve.host, cfg.serve.port = urlparse(url).hostname, urlparse(url).port
    cfg.ray.dashboard_url = DASHBOARD["url"]
    sv = serving_summary(cfg, timeout=30.0)  # a loaded machine answers slowly; down is tested below
    assert sv["api_ok"] and sv["api"] == f"{url}/v1", sv
    assert sv["app_status"] == "RUNNING", sv
    assert set(sv["deployments"]) == {"FleetIngress", "FleetModel"}
    assert all(
        d["status"] == "HEALTHY" and d["replicas"].get("RUNNING", 0) >= 1 for d in sv["deployments"].values()
    ), sv["deployments"]

    cfg.serve.port = free_port()  # nothing listens there
    cfg.ray.dashboard_url = f"http://127.0.0.1:{free_port()}"
    down = serving_summary(cfg, timeout=1.0)
    assert not down["api_ok"] and down["api_error"] and down["app_status"] is None
    assert "not reachable" in down["app_error"]
