import pytest

from semiseg import config as C
from semiseg.config import ConfigError
from semiseg.methods import METHODS, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_the_method_section_is_validated_by_the_table_the_caller_passes():
    import dataclasses
    from types import SimpleNamespace

    @dataclasses.dataclass(frozen=True)
    class Toy(C.MethodConfig):
        name: str = "toy"
        """method name"""
        beta: float = 1.0
        """a toy weight"""

    table = {"toy": SimpleNamespace(Config=Toy)}
    cfg = C.from_dict({"method": {"name": "toy", "beta": "1/4"}}, table)
    assert isinstance(cfg.method, Toy) and cfg.method.beta == 0.25
    with pytest.raises(ConfigError, match="unknown method 'unimatch'; choose from toy"):
        C.from_dict({"method": {"name": "unimatch"}}, table)


def test_replace_validates_and_keeps_the_method_class():
    cfg = load_config(None, ["method.name=unimatch", "method.tau=0.5"])
    out = C.replace(cfg, data={"batch_size": 3}, method={"w_fp": 0.0})
    assert out.data.batch_size == 3 and out.data.crop == cfg.data.crop
    assert type(out.method) is type(cfg.method) and out.method.tau == 0.5 and out.method.w_fp == 0.0
    with pytest.raises(ConfigError, match="data.batch_sise: unknown key"):
        C.replace(cfg, data={"batch_sise": 3})
    with pytest.raises(ConfigError, match="optim.lr: expected float"):
        C.replace(cfg, optim={"lr": "fast"})


def test_every_field_has_a_doc_line():
    import ast
    import inspect

    src = inspect.getsource(C)
    tree = ast.parse(src)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config") and node.name != "ConfigError":
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), (
                        f"{node.name}.{stmt.target.id} has no doc line"
                    )


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "optim.lrr" in msg and str(p) in msg and "\n" not in msg


def test_unknown_section(tmp_path):
    p = write(tmp_path, "optimizer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="optimizer: unknown section"):
        load_config(p)


def test_wrong_type_names_key_and_file(tmp_path):
    p = write(tmp_path, "data:\n  crop: big\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "data.crop" in str(e.value) and "expected int" in str(e.value) and str(p) in str(e.value)


def test_bool_is_not_an_int(tmp_path):
    p = write(tmp_path, "data:\n  crop: true\n")
    with pytest.raises(ConfigError, match="data.crop"):
        load_config(p)


def test_invalid_yaml_names_line(tmp_path):
    p = write(tmp_path, "data:\n  crop: 3\n bad: [\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(p)


def test_overrides_coerce_types(tmp_path):
    p = write(tmp_path, "data:\n  crop: 100\n")
    cfg = load_config(p, ["data.crop=321", "optim.lr=0.002", "data.scale_range=0.5,1.5", "train.channels_last=on"])
    assert cfg.data.crop == 321 and cfg.optim.lr == 0.002
    assert cfg.data.scale_range == (0.5, 1.5) and cfg.train.channels_last == "on"
    cfg = load_config(None, ["optim.lr=1e-3", "train.epochs=1/2", "eval.scales=[1.0, 2]"])
    assert cfg.optim.lr == 0.001 and cfg.train.epochs == 0.5 and cfg.eval.scales == (1.0, 2.0)


def test_override_wrong_type_and_unknown_key():
    with pytest.raises(ConfigError, match="data.crop"):
        load_config(None, ["data.crop=abc"])
    with pytest.raises(ConfigError, match="data.crp: unknown key"):
        load_config(None, ["data.crp=3"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["data.crop"])


def test_method_section_validated_against_method_config(tmp_path):
    p = write(tmp_path, "method:\n  name: supervised\n  tau: 0.9\n")
    with pytest.raises(ConfigError, match="method.tau: unknown key"):
        load_config(p)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        load_config(None, ["method.name=nope"])
    with pytest.raises(ConfigError, match="criterion"):
        load_config(None, ["method.criterion=focal"])


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["data.crop=97", "model.aspp_rates=[6, 12, 18]", "method.criterion=ohem"])
    p = write(tmp_path, C.dump(cfg))
    again = load_config(p)
    assert again == cfg


def all_presets():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    return sorted(p for p in root.rglob("*.yaml"))


@pytest.mark.parametrize("path", all_presets(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_preset_loads_strictly(path):
    raw = C.read_yaml(path)
    if set(raw) == {"method"}:  # a method-only section that `semiseg bench` merges for the method of its name
        C.from_dict({"method": {"name": path.stem, **raw["method"]}}, METHODS, f"{path}: ")
        return
    load_config(path)
    head = path.read_text().splitlines()[0]
    assert head.startswith("#"), f"{path} must open with a comment (command, hardware, expected result)"


def test_cli_error_is_one_line_even_from_a_loader_worker():
    from semiseg.cli import one_line
    from semiseg.errors import DataError

    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nsemiseg.errors.DataError: masks/a.png: label 17 out of range'
    )
    assert one_line(wrapped) == "masks/a.png: label 17 out of range"
    assert one_line(DataError("a: b")) == "a: b"


def test_cli_bad_config_key_prints_one_line_and_exits_2(tmp_path, capsys):
    from semiseg.cli import main

    p = tmp_path / "bad.yaml"
    p.write_text("# x\ndata:\n  crp: 3\n")
    assert main(["train", str(p), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data.crp" in err and str(p) in err
    assert not (tmp_path / "run").exists()
