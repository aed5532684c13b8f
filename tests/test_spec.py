"""CompressSpec: defaults, validation of every field, file formats, merging of CLI overrides."""
import dataclasses
import json
import os
import pathlib
import re

import pytest
import yaml

from vitprune.errors import InputError, SpecError
from vitprune.spec import IMPORTANCES, METHODS, RANKINGS, CompressSpec, options, read_block_indices, token_parts

pytestmark = pytest.mark.usefixtures("one_thread")


def test_defaults():
    s = CompressSpec()
    assert s.target_flops is None and s.method == "width" and s.importance == "l2"
    assert s.ranking == "global" and s.round_to == 32 and s.min_keep == 0.1
    assert (s.prune_residual, s.prune_mlp, s.prune_heads, s.prune_head_dim) == (True,) * 4
    assert (s.calib_batches, s.batch_size, s.seed, s.input_size) == (4, 8, 0, None)
    assert "width" in METHODS and isinstance(METHODS, tuple)
    assert IMPORTANCES == ("l2", "taylor") and RANKINGS == ("global", "uniform")


@pytest.mark.parametrize("value", [1.0, 0.5, 1e-6, 1])
def test_target_flops_accepted(value):
    assert CompressSpec(target_flops=value).target_flops == float(value)


@pytest.mark.parametrize(
    "field,value",
    [
        ("target_flops", 0), ("target_flops", 0.0), ("target_flops", -0.5), ("target_flops", 1.5),
        ("target_flops", float("nan")), ("target_flops", "0.5"), ("target_flops", True),
        ("method", "WIDTH"), ("importance", "l1"), ("ranking", "local"),
        ("round_to", 0), ("round_to", 2.0), ("round_to", True),
        ("prune_residual", "yes"), ("prune_mlp", 1), ("prune_heads", None), ("prune_head_dim", 0),
        ("min_keep", 0), ("min_keep", 1.5), ("min_keep", -0.1),
        ("calib_batches", 0), ("batch_size", -1), ("batch_size", 1.5), ("seed", 0.5), ("seed", "1"),
        ("input_size", (3, 32)), ("input_size", (3, 0, 32)), ("input_size", "3,32,32"),
    ],
)
def test_bad_value_names_the_field(field, value):
    with pytest.raises(SpecError) as e:
        CompressSpec(**{field: value})
    assert field in str(e.value)
    assert isinstance(e.value, InputError)  # SpecError is a kind of InputError: CLI exit 2


def test_choice_error_lists_allowed_values():
    with pytest.raises(SpecError, match="l2, taylor"):
        CompressSpec(importance="fisher")
    with pytest.raises(SpecError, match=r"\(0, 1\]"):
        CompressSpec(target_flops=2)


def test_from_dict_unknown_key_lists_valid_keys():
    with pytest.raises(SpecError) as e:
        CompressSpec.from_dict({"target_flops": 0.5, "target_flop": 0.5})
    msg = str(e.value)
    assert "target_flop" in msg and "valid keys" in msg and "round_to" in msg


def test_from_dict_not_a_mapping():
    with pytest.raises(SpecError, match="mapping"):
        CompressSpec.from_dict([1, 2])


def test_input_size_list_becomes_tuple():
    assert CompressSpec.from_dict({"input_size": [3, 64, 64]}).input_size == (3, 64, 64)


@pytest.mark.parametrize("ext", [".json", ".yaml", ".yml"])
def test_file_round_trip(tmp_path, ext):
    spec = CompressSpec(target_flops=0.5, importance="taylor", ranking="uniform", round_to=8,
                        prune_heads=False, min_keep=0.25, calib_batches=2, batch_size=4, seed=3,
                        input_size=(3, 64, 64))
    p = tmp_path / f"spec{ext}"
    p.write_text(json.dumps(spec.to_dict()) if ext == ".json" else yaml.safe_dump(spec.to_dict()))
    assert CompressSpec.from_file(p) == spec
    assert CompressSpec.from_file(str(p)) == spec


def test_yaml_file_partial(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("target_flops: 0.6\nprune_mlp: false\n")
    s = CompressSpec.from_file(p)
    assert s.target_flops == 0.6 and s.prune_mlp is False and s.round_to == 32


@pytest.mark.parametrize(
    "name,text,match",
    [
        ("s.json", "{not json", "not valid JSON"),
        ("s.yaml", "a: [1, 2\n", "not valid YAML"),
        ("s.yaml", "", "mapping"),
        ("s.json", "[0.5]", "mapping"),
        ("s.json", '{"target_flops": 1.5}', "target_flops"),
        ("s.yaml", "rount_to: 8\n", "rount_to"),
        ("s.txt", "target_flops: 0.5", r"\.json, \.yaml or \.yml"),
        # JSON and PyYAML both keep the last of two equal keys; a spec file refuses them instead
        ("d.json", '{"round_to": 8, "target_flops": 0.5, "round_to": 32}', "'round_to' is given twice"),
        ("d.yaml", "round_to: 8\ntarget_flops: 0.5\nround_to: 32\n", r"'round_to' is given twice \(lines 1 and 3\)"),
        ("d.yml", "target_flops: 0.5\nmin_keep: 0.2\nmin_keep: 0.2\n", "'min_keep' is given twice"),
    ],
)
def test_bad_files(tmp_path, name, text, match):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(SpecError, match=match) as e:
        CompressSpec.from_file(p)
    assert str(p) in str(e.value)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        CompressSpec.from_file(tmp_path / "nope.json")
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(SpecError):
        CompressSpec.from_file(p)


def test_merged_overrides_only_non_none():
    base = CompressSpec(target_flops=0.5, importance="taylor", prune_mlp=False)
    m = base.merged(target_flops=None, importance="l2", round_to=8, prune_mlp=None, prune_heads=False)
    assert m.target_flops == 0.5 and m.importance == "l2" and m.round_to == 8
    assert m.prune_mlp is False and m.prune_heads is False
    assert base.importance == "taylor"  # the original is untouched


def test_merged_validates():
    with pytest.raises(SpecError, match="target_flops"):
        CompressSpec().merged(target_flops=0.0)
    with pytest.raises(SpecError, match="valid keys"):
        CompressSpec().merged(target=0.5)


def test_to_dict_is_json_and_yaml_safe():
    d = CompressSpec(input_size=(3, 32, 32)).to_dict()
    assert d["input_size"] == [3, 32, 32]
    assert set(d) == set(CompressSpec.field_names())
    assert CompressSpec.from_dict(json.loads(json.dumps(d))) == CompressSpec(input_size=(3, 32, 32))
    assert CompressSpec.from_dict(yaml.safe_load(yaml.safe_dump(d))).input_size == (3, 32, 32)


# ------------------------------------------------------------------------------------------ no silent ignore
@pytest.mark.parametrize("tokens,match", [
    ("keep=0.5,start=4,start=6", "start is given twice"),
    ("keep=0.5,keep=0.7,start=4", "keep is given twice"),
    ("keep=0.5", "keep= and start="),
    ("start=2,every=2", "keep= and start="),
    ("keep=0,start=2", r"keep must be a fraction in \(0, 1\]"),
    ("keep=inf,start=2", "keep must be a fraction"),
    ("keep=0.5,start=0", "start must be an integer >= 1"),
    ("keep=0.5,start=2,every=x", "every must be an integer"),
    ("keep=0.5,begin=2", "cannot read 'begin=2'"),
    (5, "must be a string"),
])
def test_token_syntax_is_checked_without_a_model(tokens, match):
    with pytest.raises(SpecError, match=match):
        CompressSpec(tokens=tokens)


def test_token_parts():
    assert token_parts(" keep=0.7 , start=3, every=3 ") == {"keep": 0.7, "start": 3, "every": 3}
    assert CompressSpec(tokens="keep=0.5,start=4").tokens == "keep=0.5,start=4"


@pytest.mark.parametrize("seed", [-1, 2**64, 99999999999999999999999])
def test_seed_range(seed):
    with pytest.raises(SpecError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        CompressSpec(seed=seed)
    assert CompressSpec(seed=2**64 - 1).seed == 2**64 - 1


def test_requests_that_need_training_data():
    CompressSpec(epochs=3).check_data(True)
    CompressSpec().check_data(False)
    with pytest.raises(SpecError, match="epochs=3 .* --data"):
        CompressSpec(epochs=3).check_data(False)
    with pytest.raises(SpecError, match="search"):
        CompressSpec(depth_selection="search").check_data(False)
    for kw in (dict(epochs=2), dict(depth_selection="search")):
        with pytest.raises(SpecError, match="target_latency does not train"):
            CompressSpec(target_latency=0.5, **kw)


@pytest.mark.parametrize("method", ["width", "boundarydpt+"])
def test_cost_latency_is_for_the_planners_that_spend_it(method):
    """The width and the joint BoundaryDPT+ planners can plan to estimated latency; the others plan to
    FLOPs only, so ``cost: latency`` with them would be ignored and is refused."""
    assert CompressSpec(method=method, target_flops=0.5, cost="latency").cost == "latency"
    for other in ("boundarydpt", "cpvit"):
        with pytest.raises(SpecError, match=rf"cost 'latency' .* needs method 'width' or 'boundarydpt\+' .*"
                                            rf"got method '{other}'"):
            CompressSpec(method=other, target_flops=0.5, cost="latency")
    with pytest.raises(SpecError, match="got method .*, target_latency"):
        CompressSpec(method=method, target_latency=0.5, cost="latency")


def test_keep_everything_beside_a_removal_is_refused_not_skipped():
    """target_flops=1.0 used to return an empty recipe, silently dropping what else was asked."""
    with pytest.raises(SpecError, match=r"target_flops=1.0 keeps the whole model, but remove_attention=\[1\], "
                                        r"tokens='keep=0.5,start=2'"):
        CompressSpec(target_flops=1.0, remove_attention=[1], tokens="keep=0.5,start=2").validate()
    CompressSpec(target_flops=1.0).validate()
    CompressSpec(remove_attention=[1]).validate()  # explicit removals need no target


# ------------------------------------------------------------------------------------------ one home per field
def test_every_field_has_an_option_with_help():
    assert list(options()) == list(CompressSpec.field_names())
    assert all(o.help and (o.cli or o.flag is None) for o in options().values())
    assert options()["method"].choices == METHODS and options()["importance"].choices == IMPORTANCES


@pytest.mark.parametrize("name", [n for n, o in options().items() if o.choices])
def test_choices_are_validated_from_the_options(name):
    with pytest.raises(SpecError, match=re.escape(f"{name} must be one of {', '.join(options()[name].choices)};")):
        CompressSpec(**{name: "no-such-choice"})


def test_block_indices_from_text():
    assert read_block_indices("0, 3,7,") == [0, 3, 7]
    with pytest.raises(SpecError, match="like 0,3,7"):
        read_block_indices("0,x")
    with pytest.raises(SpecError, match=">= 0"):
        read_block_indices("-1")


def _readme_spec_table() -> dict[str, tuple[str, str]]:
    """README "Spec format": {field: (default, flag)} from its table."""
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Spec format", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`") and cells[0] != "field":
            rows[cells[0].strip("`")] = (cells[1].strip("`"), cells[2].strip("`").split(" ")[0])
    return rows


def test_readme_spec_table_matches_the_dataclass():
    """The README's table is written by hand: it names every field with its default and flag."""
    rows = _readme_spec_table()
    assert set(rows) == set(CompressSpec.field_names())
    for f in dataclasses.fields(CompressSpec):
        option = options()[f.name]
        assert json.loads(rows[f.name][0]) == f.default, f.name
        assert rows[f.name][1] == (option.flag_for(f.name) if option.cli else ""), f.name


# A value away from the default for every field with a ``needs``, and a spec that meets the need.
NEEDS_CASES = {
    "depth_share": (0.3, dict(method="boundarydpt+")),
    "prune_heads_cpvit": (0.5, dict(method="cpvit")),
    "lr": (0.01, dict(epochs=1)),
    "search_steps": (5, dict(method="boundarydpt+")),
    "probe_steps": (5, dict(method="boundarydpt+")),
    "latency_threads": (2, dict(target_latency=0.5)),
    "attention_variant": ("drop", dict(remove_attention=[0])),
    "merge": ("never", dict(method="boundarydpt")),
    "fold_norm": (True, dict(remove_activation=[1])),
}


def test_every_needs_is_tested():
    assert {name for name, o in options().items() if o.needs is not None} == set(NEEDS_CASES)


@pytest.mark.parametrize("name", sorted(NEEDS_CASES))
def test_a_setting_without_its_need_is_refused_not_ignored(name):
    """The Python API and spec files get the check the CLI has: a field that would do nothing is an
    error naming the field, its flag and what it needs."""
    value, met = NEEDS_CASES[name]
    flag = options()[name].flag_for(name)
    with pytest.raises(SpecError, match=rf"^{name} \({flag}\) has no effect without"):
        CompressSpec(**{name: value})
    assert getattr(CompressSpec(**{name: value}, **met), name) == value


def test_the_method_registry_is_the_one_list_of_methods():
    """Names, CLI choices, stages, latency-cost methods and sweep rows all come from METHOD_REGISTRY."""
    from vitprune import sweep
    from vitprune.plan.stages import METHOD_STAGES, STAGES
    from vitprune.spec import LATENCY_COST_METHODS, METHOD_REGISTRY, METHODS

    assert tuple(METHOD_REGISTRY) == METHODS == options()["method"].choices
    for name, m in METHOD_REGISTRY.items():
        assert METHOD_STAGES[name] == m.stages and set(m.stages) <= set(STAGES)
        assert sweep.METHODS[name].label == m.label and f"{name} ({m.help})" in options()["method"].help
    assert LATENCY_COST_METHODS == ("width", "boundarydpt+")
    assert [n for n, m in METHOD_REGISTRY.items() if m.removes_layers] == ["boundarydpt", "boundarydpt+",
                                                                         "boundarydpt+paper"]


def test_a_spec_file_that_is_a_fifo_is_refused_at_once(tmp_path):
    """From the Python API too (the CLI checks first): reading a FIFO would block until a writer came."""
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    with pytest.raises(SpecError, match="not a regular file"):
        CompressSpec.from_file(fifo)
