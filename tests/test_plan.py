"""Plan schema and plan files: defaults, loading, and the errors a user sees."""

import dataclasses

import pytest

from xdit_compile.plan import SECTIONS, AttentionConfig, CompileConfig, ParallelConfig, Plan, load_plan

TOML = """
model = "black-forest-labs/FLUX.1-dev"

[parallel]
ring = 2
ulysses = 2

[attention]
backend = "sdpa"

[compile]
lowering = "inductor"
fullgraph = true
"""

YAML = """
model: black-forest-labs/FLUX.1-dev
parallel: {ring: 2, ulysses: 2}
attention:
  backend: sdpa
compile:
  lowering: inductor
  fullgraph: true
"""

EXPECTED = Plan(
    model="black-forest-labs/FLUX.1-dev",
    parallel=ParallelConfig(ring=2, ulysses=2),
    attention=AttentionConfig(backend="sdpa"),
    compile=CompileConfig(lowering="inductor", fullgraph=True),
)


def test_defaults():
    plan = Plan()
    assert plan.parallel.world_size == 1 and plan.parallel.sequence == 1
    assert plan.attention.backend == "auto" and plan.compile.lowering == "eager"
    assert plan.model is None and plan.unsupported_reason() is None
    assert Plan.from_dict({}) == plan
    assert set(SECTIONS) == {"parallel", "attention", "compile", "pipefusion", "vae", "cache", "run", "serve"}


def test_frozen_and_keyword_only():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Plan().parallel.ulysses = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        ParallelConfig(2)  # type: ignore[misc]
    with pytest.raises(TypeError, match="from_dict"):
        Plan(parallel={"ulysses": 2})  # type: ignore[arg-type]


def test_degrees():
    p = ParallelConfig(data=2, cfg=2, pipefusion=1, ring=3, ulysses=4)
    assert p.world_size == 48 and p.sequence == 12
    assert p.degrees() == (2, 2, 1, 3, 4)


@pytest.mark.parametrize(("name", "text"), [("plan.toml", TOML), ("plan.yaml", YAML), ("plan.yml", YAML)])
def test_load_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert load_plan(path) == EXPECTED
    assert load_plan(str(path)) == EXPECTED


def test_load_passthrough_and_dict():
    assert load_plan(EXPECTED) is EXPECTED
    assert load_plan(EXPECTED.to_dict()) == EXPECTED
    assert Plan.from_dict(EXPECTED.to_dict()) == EXPECTED
    assert "model" not in Plan().to_dict()  # TOML has no null
    with pytest.raises(TypeError, match="Plan, a dict or a path"):
        load_plan(3)  # type: ignore[arg-type]


def test_missing_sections_take_defaults(tmp_path):
    path = tmp_path / "plan.toml"
    path.write_text("[parallel]\nulysses = 2\n")
    plan = load_plan(path)
    assert plan.parallel == ParallelConfig(ulysses=2)
    assert plan.attention == AttentionConfig() and plan.compile == CompileConfig()
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_plan(empty) == Plan()


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ({"parallel": {"ulyses": 2}}, "plan key 'parallel.ulyses' is unknown (did you mean 'ulysses'?); "
         "valid keys: data, cfg, pipefusion, ring, ulysses"),
        ({"paralel": {"ulysses": 2}}, "plan key 'paralel' is unknown (did you mean 'parallel'?)"),
        ({"compile": {"lowring": "eager"}}, "plan key 'compile.lowring' is unknown (did you mean 'lowering'?)"),
        ({"zzz": 1}, "plan key 'zzz' is unknown; valid keys: model, parallel, attention, compile"),
    ],
)
def test_unknown_key(d, message):
    with pytest.raises(ValueError) as info:
        Plan.from_dict(d)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ({"parallel": {"ulysses": -2}}, "parallel.ulysses must be an int >= 1, got -2"),
        ({"parallel": {"ring": 0}}, "parallel.ring must be an int >= 1, got 0"),
        ({"parallel": {"ring": "2"}}, "parallel.ring must be an int >= 1, got '2'"),
        ({"parallel": {"data": 1.0}}, "parallel.data must be an int >= 1, got 1.0"),
        ({"parallel": {"ulysses": True}}, "parallel.ulysses must be an int >= 1, got True (bool)"),
        ({"parallel": {"cfg": 3}}, "parallel.cfg must be 1 or 2"),
        ({"parallel": 2}, "plan key 'parallel' must be a table of settings, got 2"),
        ({"attention": {"backend": "flash"}}, "attention.backend must be one of 'auto', 'sdpa', 'flash_attn', "
         "'yunchang', 'math', 'fa3_cute', got 'flash' (did you mean 'flash_attn'?)"),
        ({"compile": {"lowering": "tvm"}}, "compile.lowering must be one of 'eager', 'inductor', 'onediff'"),
        ({"compile": {"dynamic": 1}}, "compile.dynamic must be a bool (true or false), got 1"),
        ({"compile": {"cudagraphs": True}}, 'compile.cudagraphs = true needs compile.lowering = "inductor"'),
        ({"compile": {"overlap": True}}, 'compile.overlap = true needs compile.lowering = "inductor"'),
        ({"compile": {"max_autotune": True}}, 'compile.max_autotune = true needs compile.lowering = "inductor"'),
        ({"compile": {"max_autotune": "yes", "lowering": "inductor"}}, "compile.max_autotune must be a bool"),
        ({"compile": {"decompose_collectives": "yes"}}, "compile.decompose_collectives must be a bool"),
        ({"compile": {"ce_in_place": "yes"}}, "compile.ce_in_place must be a bool"),
        ({"compile": {"query_parts": 0}}, "compile.query_parts must be an int >= 1, got 0"),
        ({"compile": {"query_parts": 2}}, 'compile.query_parts = 2 needs compile.all_to_all = "copy_engine" and '
         "compile.ulysses_chunks = 1, got all_to_all = 'auto'"),
        ({"compile": {"query_parts": 2, "all_to_all": "copy_engine", "ulysses_chunks": 2}},
         "got all_to_all = 'copy_engine', ulysses_chunks = 2; set those or drop query_parts"),
        ({"model": 3}, "model must be a string"),
    ],
)
def test_wrong_value(d, message):
    with pytest.raises(ValueError) as info:
        Plan.from_dict(d)
    assert message in str(info.value)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="plan file '.*nope.toml' does not exist"):
        load_plan(tmp_path / "nope.toml")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[parallel\nulysses = 2\n")
    with pytest.raises(ValueError, match="could not parse plan file '.*bad.toml'"):
        load_plan(bad_toml)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("parallel: {ulysses: 2\n")
    with pytest.raises(ValueError, match="could not parse plan file '.*bad.yaml'"):
        load_plan(bad_yaml)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_plan(listy)
    typo = tmp_path / "typo.toml"
    typo.write_text("[parallel]\nulyses = 2\n")
    with pytest.raises(ValueError, match=r"plan file '.*typo.toml': plan key 'parallel.ulyses' is unknown"):
        load_plan(typo)
    with pytest.raises(ValueError, match=r"must end in \.toml, \.yaml, \.yml"):
        load_plan(tmp_path / "plan.json")


def test_check_world_size():
    plan = Plan.from_dict({"parallel": {"ring": 2, "ulysses": 2}})
    plan.check_world_size(4)
    with pytest.raises(ValueError) as info:
        plan.check_world_size(2)
    assert (
        "parallel degrees data=1 x cfg=1 x pipefusion=1 x ring=2 x ulysses=2 = 4 but the world size is 2; "
        "change the degrees so their product is 2" in str(info.value)
    )


def test_unsupported_reason():
    assert Plan.from_dict({"parallel": {"pipefusion": 2, "ring": 2, "ulysses": 2}}).unsupported_reason() is None
    assert Plan.from_dict({"parallel": {"pipefusion": 2, "ulysses": 2, "cfg": 2}}).unsupported_reason() is None
    assert Plan.from_dict({"parallel": {"ring": 2, "ulysses": 4}}).unsupported_reason() is None
    assert Plan.from_dict({"parallel": {"cfg": 2, "data": 2}}).unsupported_reason() is None


def test_dynamic_shapes_are_refused_clearly():
    reason = Plan.from_dict({"compile": {"dynamic": True}}).unsupported_reason()
    assert reason is not None and "compile.dynamic" in reason and "static shapes" in reason


@pytest.mark.parametrize("path", sorted((__import__("pathlib").Path(__file__).parents[1] / "examples").glob("*.toml")),
                         ids=lambda p: p.name)
def test_example_plans_load(path):
    """Every plan under examples/ is valid: known keys, degrees that multiply, known modes."""
    plan = load_plan(path)
    assert plan.parallel.world_size >= 1 and plan.model
