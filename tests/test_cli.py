"""The diagql command: its output in-process (tests/cli_in_process.py), and what needs a real
process (--help without torch, exit statuses of ``python -m diagql``) through subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cli_in_process import diagql

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--model", "tests.models:trained_mlp", "--data", "tests.models:digits"]


def diagql_process(*args: str) -> subprocess.CompletedProcess:
    """``python -m diagql ARGS`` as a user runs it; the tests that use it fail before torch loads,
    so each costs a Python start, not an import of torch."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "diagql", *args], check=False,
                          text=True, capture_output=True, cwd=ROOT, env=env, timeout=300)


def test_help_and_version_do_not_import_torch():
    code = ("import sys\nfrom diagql.shell.cli import main\n"
            "for argv in (['--help'], ['--version']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert 'numpy' not in sys.modules, 'numpy was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "usage: diagql" in done.stdout
    assert "diagql 0.1.0" in done.stdout


def test_a_query_answered_from_the_cache_imports_no_scipy(tmp_path):
    # scipy loads where it is used (a draw, a principal-axes fit), not on import: a new
    # process's query over a cached profile and sample then pays none of its 0.2 s.
    query = "TOPK 5 NEURONS IN conv2 USING SAMPLE random(0.05)"
    code = ("import sys\nfrom diagql.shell.cli import main\n"
            f"code = main(['--demo', '-e', {query!r}])\n"
            "assert code in (0, None), code\n"
            "print('torch._dynamo' in sys.modules, 'scipy' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DIAGQL_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=ROOT, env=env, timeout=300) for _ in range(2)]
    for done in runs:
        assert done.returncode == 0, done.stderr
        assert "conv2[" in done.stdout
    assert runs[0].stdout.strip().endswith("True")  # the first drew and fitted: it did use it
    assert runs[1].stdout.strip().endswith("False"), runs[1].stdout
    # Nor torch._dynamo (a second to import): the eager stance is for compiled models only.
    assert all(done.stdout.strip().split()[-2] == "False" for done in runs), runs[0].stdout


def test_query_on_a_user_model_prints_a_table():
    done = diagql(*MODEL, "-e", "TOPK 3 NEURONS IN encoder.1 WHERE incorrect")
    assert done.returncode == 0, done.stderr
    assert "encoder.1[" in done.stdout
    assert "rank" in done.stdout
    assert "TOPK 3 NEURONS IN encoder.1 WHERE incorrect" in done.stdout  # labels the result


def test_format_choices_and_batch_size_default_are_the_sessions():
    from diagql.session.settings import FORMATS, Settings
    from diagql.shell.cli import build_parser

    args = build_parser().parse_args([])
    defaults = Settings()
    assert (args.batch_size, args.format) == (defaults.batch_size, defaults.format) == (256, "table")
    assert [build_parser().parse_args(["--format", f]).format for f in FORMATS] == list(FORMATS)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--format", "xml"])


def test_json_output_is_one_object_per_statement():
    done = diagql(*MODEL, "--format", "json", "-e", "SHOW LAYERS; TOPK 2 NEURONS IN head")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2
    layers, top = map(json.loads, lines)
    assert ["encoder.1"] == [row[0] for row in layers["rows"] if row[0] == "encoder.1"]
    assert top["kind"] == "topk" and len(top["neurons"]) == 2
    assert top["labels"][0].startswith("head[")


def test_csv_output_has_a_header_and_a_row_per_neuron():
    done = diagql(*MODEL, "--format", "csv", "-e", "AVG NEURONS IN encoder.3 WHERE class = 3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "neuron,label,value"
    assert len(lines) == 1 + 16
    assert lines[1].startswith("0,encoder.3[0],")


def test_script_from_stdin_and_set_format():
    done = diagql(*MODEL, stdin="SET format = csv;\nTOPK 2 NEURONS IN head WHERE correct;\n")
    assert done.returncode == 0, done.stderr
    assert "rank,neuron,label,value" in done.stdout


def test_error_in_a_script_reports_file_line_column_with_a_caret(tmp_path):
    script = tmp_path / "report.dql"
    script.write_text("SHOW LAYERS;\n-- the next one is wrong\nTOPK 3 NEURONS IN encoder.7;\n"
                      "TOPK 2 NEURONS IN head;\n")
    done = diagql(*MODEL, str(script))
    assert done.returncode == 1
    first, source, caret = done.stderr.splitlines()[:3]
    assert first.startswith(f"{script}:3:19: error: unknown layer 'encoder.7'")
    assert source.strip() == "TOPK 3 NEURONS IN encoder.7;"
    assert caret.index("^") == source.index("encoder.7")
    assert "Traceback" not in done.stderr
    # The statement before the error printed its result; the one after did not run.
    assert "encoder.1" in done.stdout
    assert "head[" not in done.stdout


@pytest.mark.parametrize("first,error", [
    ("TOPK 2 NEURONS IN head WHERE;", "report.dql:1:29: syntax error: unexpected end of statement"),
    # An open string had swallowed the ';' and the next line into its statement.
    ("TOPK 2 NEURONS IN head WHERE class = 'cat;",
     "report.dql:1:38: syntax error: unterminated quoted string"),
])
def test_keep_going_runs_the_rest_but_still_fails(tmp_path, first, error):
    script = tmp_path / "report.dql"
    script.write_text(f"{first}\nTOPK 2 NEURONS IN head;\n")
    done = diagql(*MODEL, "--keep-going", str(script))
    assert done.returncode == 1
    assert error in done.stderr
    assert "head[" in done.stdout


def test_errors_are_written_as_typed_without_emoji_codes(tmp_path):
    """rich had read ':100:' in 'report.dql:100:10:' and a quoted ':fire:' as emoji codes
    (sweep SY3): the place was lost, and JSON's statement was not the one that ran."""
    script = tmp_path / "report.dql"
    script.write_text("-- a comment\n" * 99 + "TOPK 2 NEURONS IN hed;\nDESCRIBE ':fire:';\n")
    done = diagql(*MODEL, "--keep-going", str(script))
    assert "report.dql:100:19: error: unknown layer 'hed'" in done.stderr
    assert "report.dql:101:10: error: unknown layer ':fire:'" in done.stderr
    done = diagql(*MODEL, "--keep-going", "--format", "json", str(script))
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines[1]["statement"] == "DESCRIBE ':fire:'" and ":fire:" in lines[1]["error"]


def test_a_json_error_record_shortens_a_long_quoted_text_as_the_text_error_does():
    name = "x" * 5000
    done = diagql(*MODEL, "--keep-going", "--format", "json", "-e", f"DESCRIBE {name}")
    record = json.loads(done.stdout.splitlines()[0])
    assert record["error"].startswith("unknown layer 'xxx") and len(record["error"]) < 200
    assert "(5,000 characters)" in record["error"]
    for field in ("statement", "source_line"):  # the user's own text, shortened as well
        assert record[field].startswith("DESCRIBE xxx") and len(record[field]) < 1100
        assert record[field].endswith("x (5,009 characters)")


def test_piped_tables_end_their_lines_without_padding():
    """rich pads each line of a table to its width: a title's line had ended in 34 spaces
    (sweep SY3)."""
    done = diagql(*MODEL, "-e", "SHOW LAYERS", "-e", "TOPK 3 NEURONS IN head")
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and any("layers of" in line for line in lines)
    assert all(line == line.rstrip() for line in lines)


def test_keep_going_in_json_gives_every_statement_its_line(tmp_path):
    """JSON Lines: a failed statement had written no line (three statements, two lines), so
    a reader lost track of which answer was which."""
    script = tmp_path / "report.dql"
    script.write_text("TOPK 2 NEURONS IN head;\nTOPK 2 NEURONS IN hed;\nSET seed = 3;\n"
                      "TOPKK 2 NEURONS -- a typo\n  IN head;\n")
    done = diagql(*MODEL, "--keep-going", "--format", "json", str(script))
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["kind"] for line in lines] == ["topk", "error", "set", "error"]
    # A statement that does not parse is named too (it had been null: sweep SY3).
    assert lines[3]["statement"] == "TOPKK 2 NEURONS IN head"
    assert lines[1]["line"] == 2 and lines[1]["source_line"] == "TOPK 2 NEURONS IN hed;"
    assert lines[1]["error"].startswith("unknown layer 'hed'")
    assert lines[1]["statement"] == "TOPK 2 NEURONS IN hed"  # named where nothing places it


def test_syntax_error_names_what_was_expected():
    done = diagql(*MODEL, "-e", "TOPK 3 NEURONS IN head WHERE klass = 3")
    assert done.returncode == 1
    assert "<-e>:1:30: syntax error: unexpected 'klass'" in done.stderr
    assert "CLASS" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "tests.models:nothing_here", "--data", "tests.models:digits"],
     "has no attribute 'nothing_here'"),
    (["--model", "no_such_module:build", "--data", "tests.models:digits"],
     "cannot import 'no_such_module'"),
    (["--model", "tests.models:digits", "--data", "tests.models:digits"], "not a torch.nn.Module"),
    (["--model", "tests.models", "--data", "tests.models:digits"], "is not MODULE:CALLABLE"),
    (["--model", "/elsewhere/models.py:build", "--data", "tests.models:digits"],
     "--model '/elsewhere/models.py:build': no such file '/elsewhere/models.py'"),
    (["--model", "tests.models:trained_mlp", "--data", "README.md"],
     "DiagQL reads data files ending .pt, .pth, .npz, .npy, .safetensors; another file is read "
     "by a function of yours"),
    (["--model", "tests.models:trained_mlp", "--weights", "missing.pt", "--data",
      "tests.models:digits"], "no such file"),
])
def test_bad_model_specs_get_one_clear_line(args, message):
    done = diagql(*args, "-e", "SHOW LAYERS")
    assert done.returncode == 1
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def _torch_mean(rows) -> np.ndarray:
    """encoder.3's float64 mean over ``rows`` of the digits, by a plain forward hook."""
    import torch

    from tests.models import digits, trained_mlp

    model, (X, _) = trained_mlp(), digits()
    seen = []
    handle = model.encoder[3].register_forward_hook(lambda m, i, o: seen.append(o.double()))
    with torch.no_grad():
        model(X[rows])
    handle.remove()
    return seen[0].mean(dim=0).numpy()


def _answer(done) -> np.ndarray:
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    return np.array([value for _, value in sorted(zip(answer["neurons"], answer["values"]))])


def test_data_files_and_a_models_file_answer_as_torch_does(tmp_path):
    import torch

    from tests.models import digits

    X, y = digits()
    torch.save((X, y), tmp_path / "data.pt")
    np.savez(tmp_path / "data.npz", X.numpy(), y.numpy())
    np.savez(tmp_path / "named.npz", x=X.numpy(), labels=y.numpy())
    np.save(tmp_path / "inputs.npy", X.numpy())
    (tmp_path / "mine.py").write_text("from tests.models import trained_mlp\n\n\n"
                                      "def build():\n    return trained_mlp()\n")
    threes = _torch_mean((y == 3).numpy())
    for model in ("tests.models:trained_mlp", str(tmp_path / "mine.py") + ":build",
                  "tests/models.py:trained_mlp"):
        for data in ("data.pt", "data.npz", "named.npz"):
            done = diagql("--model", model, "--data", str(tmp_path / data), "--no-cache",
                          "--format", "json", "-e", "AVG NEURONS IN encoder.3 WHERE class = 3")
            np.testing.assert_allclose(_answer(done), threes, rtol=0, atol=1e-6)
    done = diagql("--model", "tests.models:trained_mlp", "--data", str(tmp_path / "inputs.npy"),
                  "--no-cache", "--format", "json", "-e", "AVG NEURONS IN encoder.3")
    np.testing.assert_allclose(_answer(done), _torch_mean(slice(None)), rtol=0, atol=1e-6)


def _layers_csv(tmp_path, spec: str, width: int, classes: int) -> list[str]:
    """SHOW LAYERS' CSV rows for ``--model spec`` run in tmp_path over 20 random items of
    ``width`` features and ``classes`` labels, saved there as data.pt."""
    import torch

    torch.save((torch.randn(20, width), torch.arange(20) % classes), tmp_path / "data.pt")
    done = diagql("--model", spec, "--data", "data.pt", "--no-cache", "--format", "csv", "-e",
                  "SHOW LAYERS", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[1:]


def test_a_models_file_is_the_file_named_not_a_package_of_the_same_dotted_name(tmp_path):
    """tests/models.py in a folder without __init__.py imported as tests.models had found this
    repository's tests package: another model, silently (review PP1)."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "models.py").write_text(
        "from torch import nn\n\n\ndef trained_mlp():\n    return nn.Sequential("
        "nn.Linear(64, 7))\n")
    assert _layers_csv(tmp_path, "tests/models.py:trained_mlp", 64, 7) == ["0,Linear,7,7,"]
    done = diagql("--model", "mine.py", "--data", "data.pt", "-e", "SHOW LAYERS", cwd=tmp_path)
    assert "is not MODULE:CALLABLE" in done.stderr  # no such file, and no callable named
    # A file without its callable: the names it defines are suggested (read, not imported),
    # where a made-up 'build' had been.
    done = diagql("--model", "tests/models.py", "--data", "data.pt", "-e", "SHOW LAYERS",
                  cwd=tmp_path)
    assert "--model tests/models.py:trained_mlp (it defines trained_mlp)" in done.stderr
    for data, message in (("missing.pt", "--data 'missing.pt': no such file"),
                          ("tests", "--data 'tests' is a directory")):
        done = diagql("--model", "tests/models.py:trained_mlp", "--data", data, cwd=tmp_path)
        assert done.returncode == 1 and message in done.stderr, done.stderr


def test_a_models_file_imports_the_files_beside_it(tmp_path):
    """proj/net.py's `from helpers import Body`, which `python proj/net.py` finds, had failed
    with "No module named 'helpers'": a file under the current directory imports under its
    dotted name, and its own folder was not on the import path (sweep S36)."""
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "helpers.py").write_text(
        "from torch import nn\n\n\nclass Body(nn.Sequential):\n    pass\n")
    (tmp_path / "proj" / "net.py").write_text(
        "from torch import nn\nfrom helpers import Body\n\n\ndef build():\n"
        "    return Body(nn.Linear(4, 3))\n")
    assert _layers_csv(tmp_path, "proj/net.py:build", 4, 3) == ["0,Linear,3,3,"]


def test_files_that_hold_no_model_or_need_pickled_code_are_refused_with_what_to_give(tmp_path):
    import torch

    from tests.models import digits, trained_mlp

    X, y = digits()
    model = trained_mlp()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save(model, tmp_path / "whole.pt")
    torch.jit.save(torch.jit.script(model), tmp_path / "scripted.pt")
    torch.save(torch.utils.data.TensorDataset(X, y), tmp_path / "dataset.pt")
    torch.save((X.numpy(), y.numpy()), tmp_path / "arrays.pt")
    (tmp_path / "notes.pt").write_text("hello")
    data = ["--data", "tests.models:digits"]
    for args, message in [
            (["--model", str(tmp_path / "weights.pt"), *data], "holds weights (a state_dict), "
             f"not a model: name the function that builds the model, with the file as its "
             f"weights: --model mymodule:build --weights {tmp_path / 'weights.pt'}"),
            (["--model", str(tmp_path / "whole.pt"), *data],
             "holds an object saved whole (torch.save(model)?), and DiagQL runs no pickled code"),
            (["--model", str(tmp_path / "scripted.pt"), *data],
             "is TorchScript, whose layers take no forward hooks"),
            (["--model", "tests.models:trained_mlp", "--data", str(tmp_path / "dataset.pt")],
             "holds Python objects besides tensors (a Dataset?), and DiagQL runs no pickled "
             "code: save the tensors themselves, torch.save((X, y), path)"),
            # numpy arrays and a text file were told the same (sweep S36)
            (["--model", "tests.models:trained_mlp", "--data", str(tmp_path / "arrays.pt")],
             "holds numpy arrays, which torch.load reads only by running pickled code: save "
             "them with np.savez(path, X, y), or as tensors (torch.from_numpy)"),
            (["--model", "tests.models:trained_mlp", "--data", str(tmp_path / "notes.pt")],
             "could not be read: it is no torch file (it is text)")]:
        done = diagql(*args, "-e", "SHOW LAYERS")
        assert done.returncode == 1
        assert message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_a_misspelt_spec_is_suggested_and_a_failing_factory_shown_with_debug(tmp_path):
    (tmp_path / "mymodels.py").write_text("def build():\n    raise RuntimeError('factory "
                                          "failed')\n\ndef data():\n    return None\n")
    done = diagql("--model", "mymodels:biuld", "--data", "mymodels:data", "-e", "SHOW LAYERS",
                  cwd=tmp_path)
    assert "has no attribute 'biuld'; did you mean 'build'?" in done.stderr
    done = diagql("--model", "mymodel:build", "--data", "mymodels:data", "-e", "SHOW LAYERS",
                  cwd=tmp_path)
    assert "No module named 'mymodel'; did you mean 'mymodels'?" in done.stderr
    done = diagql("--model", "mymodels:build", "--data", "mymodels:data", "-e", "SHOW LAYERS",
                  cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "raised RuntimeError: factory failed (--debug shows where)" in done.stderr
    done = diagql("--model", "mymodels:build", "--data", "mymodels:data", "--debug", "-e",
                  "SHOW LAYERS", cwd=tmp_path)
    assert done.returncode == 1 and "mymodels.py" in done.stderr  # where the user's code failed
    sys.modules.pop("mymodels", None)


def test_a_failing_forward_is_shown_where_it_failed_with_debug(tmp_path):
    (tmp_path / "brokenfwd.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(4, 3)\n\n"
        "    def forward(self, x):\n"
        "        return self.fc(torch.cat([x, x], 1))  # the user's slip\n\n"
        "def build():\n    return Net()\n\n"
        "def data():\n    return torch.randn(20, 4), torch.randint(0, 3, (20,))\n")
    args = ("--model", "brokenfwd:build", "--data", "brokenfwd:data", "-e", "SHOW LAYERS")
    done = diagql(*args, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "the model's forward raised RuntimeError" in done.stderr
    done = diagql(*args, "--debug", cwd=tmp_path)
    assert done.returncode == 1 and "brokenfwd.py" in done.stderr  # the forward's own line
    sys.modules.pop("brokenfwd", None)


def test_weights_that_do_not_fit_are_reported(tmp_path):
    import torch

    path = tmp_path / "wrong.pt"
    torch.save({"encoder.1.weight": torch.zeros(3, 3)}, path)
    done = diagql("--model", "tests.models:trained_mlp", "--weights", str(path), "--data",
                  "tests.models:digits", "-e", "SHOW LAYERS")
    assert done.returncode == 1
    assert "does not fit the model" in done.stderr and "Traceback" not in done.stderr


def test_statements_that_need_no_model_run_without_one():
    done = diagql("-e", "SHOW SAMPLERS")
    assert done.returncode == 0, done.stderr
    assert "stratified" in done.stdout
    done = diagql("-e", "SHOW LAYERS")
    assert done.returncode == 1
    assert "no model is connected" in done.stderr


def test_usage_errors_exit_2():
    done = diagql_process("--model", "tests.models:trained_mlp", "-e", "SHOW LAYERS")
    assert done.returncode == 2
    assert "--model and --data go together" in done.stderr


def test_missing_script_file():
    done = diagql_process(*MODEL, "does-not-exist.dql")
    assert done.returncode == 1
    assert "cannot read script does-not-exist.dql" in done.stderr


def test_a_script_with_a_byte_order_mark_or_not_in_utf8(tmp_path):
    """Notepad's BOM failed the first statement at 1:1; a Latin-1 file was an internal error."""
    marked = tmp_path / "marked.dql"
    marked.write_bytes("SHOW SETTINGS; -- café\n".encode("utf-8-sig"))
    latin = tmp_path / "latin.dql"
    latin.write_bytes("SHOW SETTINGS; -- café\n".encode("latin-1"))
    done = diagql("--format", "csv", "-", str(marked), stdin="\ufeffSHOW SAMPLERS;")
    assert done.returncode == 0, done.stderr
    assert "stratified" in done.stdout and "batch_size" in done.stdout
    done = diagql(str(latin))
    assert done.returncode == 1 and "internal error" not in done.stderr
    assert f"cannot read script {latin}: not UTF-8 text (byte 0xe9 at offset 21)" in done.stderr
    # --checkpoint ckpt/*.pt unquoted: the shell hands the second file over as a script.
    weights = tmp_path / "epoch2.pt"
    weights.write_bytes(b"PK\x03\x04\xff\xfe torch zip")
    done = diagql("--format", "csv", str(weights))
    assert done.returncode == 1 and "an unquoted glob expanded by the shell? quote it: " \
        "--checkpoint 'ckpt/*.pt'" in done.stderr


def test_plot_that_nothing_draws_says_so(tmp_path):
    """--plot with no statement that makes a figure wrote nothing without a word."""
    target = tmp_path / "f.png"
    done = diagql("--plot", str(target), "-e", "SHOW SAMPLERS")
    assert done.returncode == 0, done.stderr
    assert not target.exists()
    assert (f"--plot: nothing was written to {target}: no statement made a figure (EVALUATE "
            f"SAMPLERS, SIMILARITY, TOPK k INPUTS and ACROSS CHECKPOINTS do)") in \
        " ".join(done.stderr.split())


def test_ray_options_need_the_ray_engine():
    done = diagql_process(*MODEL, "--ray-workers", "2", "-e", "SHOW LAYERS")
    assert done.returncode == 2
    assert "--ray-address and --ray-workers need --engine ray" in done.stderr
    done = diagql_process("--engine", "ray", "-e", "SHOW SAMPLERS")
    assert done.returncode == 2 and "--engine ray needs a model" in done.stderr
    done = diagql_process("--engine", "ray", "--model", "x:y", "--checkpoint", "c.pt", "--data", "x:d",
                  "-e", "SHOW MODELS")
    assert done.returncode == 2 and "--engine ray runs no checkpoints" in done.stderr


def test_a_warning_is_one_line_naming_what_happened(tmp_path):
    # A cache directory that cannot be written: Python's own form had printed the source
    # file, line number and source line of the warning before the statement's output.
    not_a_directory = tmp_path / "cache"
    not_a_directory.write_text("mine")
    done = diagql(*MODEL, "-e", "AVG NEURONS IN encoder.1 WHERE incorrect USING SAMPLE "
                  "random(0.1)", env={"DIAGQL_CACHE_DIR": str(not_a_directory)})
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "cache disabled" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: cache disabled: cannot write to")
    assert ".py:" not in done.stderr and "DiagQLWarning" not in done.stderr


def test_classes_name_the_classes_on_the_command_line():
    names = "zero,one,two,three,four,five,six,seven,eight,nine"
    done = diagql(*MODEL, "--classes", names, "--format", "json", "-e",
                  "AVG NEURONS IN head WHERE class = 'three'", "-e",
                  "AVG NEURONS IN head WHERE class = 3")
    assert done.returncode == 0, done.stderr
    by_name, by_index = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert by_name["n_items"] == by_index["n_items"] > 0
    assert by_name["values"] == by_index["values"]
    done = diagql(*MODEL, "--classes", "a,,b", "-e", "SHOW MODELS")
    assert done.returncode == 2 and "has an empty class name" in done.stderr
    done = diagql(*MODEL, "--classes", "a,a", "-e", "SHOW MODELS")
    assert done.returncode == 2 and "'a,a' names two classes 'a'" in done.stderr


def test_a_piped_table_is_as_wide_as_it_needs_never_cut():
    """Piped, the console was 120 columns: EVALUATE's scores came out as '0.4…' and sampler
    names split over two lines."""
    done = diagql(*MODEL, "-e", "EVALUATE SAMPLERS random, stratified, maxmargin AT 0.05, 0.1 "
                                "SEEDS 3 LAYERS head")
    assert done.returncode == 0, done.stderr
    assert "…" not in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("│ stratified ")]
    assert len(rows) == 2 and all(len(row.split("│")) == len(rows[0].split("│")) for row in rows)


def test_a_piped_tables_prose_wraps_between_words():
    """SHOW SAMPLERS piped ran 1,400 columns wide, its ranges and descriptions on one line
    each; every word is still whole."""
    from diagql.results.render import WIDE_TABLES

    done = diagql("-e", "SHOW SAMPLERS")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= WIDE_TABLES + 1
    assert "…" not in done.stdout and "(defaults to SET seed)" in done.stdout


def test_a_piped_table_of_prose_folds_at_the_pipes_width():
    """EXPLAIN's and DESCRIBE's tables ran 200 columns wide piped, one step a line, beside
    prose wrapped at 120 (sweep MM2); their steps now fold between words at 120."""
    done = diagql(*MODEL, "-e", "EXPLAIN TOPK 5 NEURONS IN encoder.0 WHERE class = 3 USING "
                                "SAMPLE maxmargin(0.1)", "-e", "DESCRIBE encoder.3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 120
    estimator = [line for line in lines if line.startswith("│ estimator")]
    assert estimator
    words = " ".join(line.split("│")[2].strip() for line in lines[lines.index(estimator[0]):]
                     if line.startswith("│ ") and line.split("│")[1].strip() in ("", "estimator"))
    assert "checked on the latent's next 3 principal components" in words  # folded whole


def test_the_demo_takes_weights_of_its_own(tmp_path):
    """train --out's weights could be read by --checkpoint only: --weights needed --model."""
    import torch

    from diagql.mnist_demo import demo
    from diagql.mnist_demo.data import demo_dataset
    from diagql.mnist_demo.model import load_model

    model = load_model()
    with torch.no_grad():
        model.fc3.bias.add_(1.0)  # another model's weights
    path = tmp_path / "other.pt"
    torch.save(model.state_dict(), path)
    conn = demo(str(path), cache_dir=False, progress=False)
    X, _ = demo_dataset(False)
    with torch.no_grad():
        want = model.eval()(X).double().mean(0).numpy()
    np.testing.assert_allclose(conn.query("AVG NEURONS IN fc3 USING FULL").values, want,
                               rtol=1e-5, atol=1e-5)
    # SHOW MODELS names the file the weights came from (it had said "as given").
    assert str(path) in str(conn.query("SHOW MODELS").rows)
    done = diagql("--demo", "--weights", str(path), "--weights", str(path), "-e", "SHOW LAYERS")
    assert done.returncode == 2 and "--demo takes one --weights PATH" in done.stderr


def test_a_cache_write_failing_at_the_end_is_warned_in_one_line(tmp_path):
    """A cache directory that is a file, with only SHOW LAYERS: the failed write surfaced as
    the process ended, after the command had put Python's warning printer back, and came out
    as 'writer.py:183: DiagQLWarning: ...' with its source line."""
    not_a_directory = tmp_path / "cache.pt"
    not_a_directory.write_text("x")
    done = diagql(*MODEL, "--cache-dir", str(not_a_directory), "-e", "SHOW LAYERS")
    assert done.returncode == 0
    assert done.stderr.count("warning: cache disabled: cannot write to") == 1, done.stderr
    assert "DiagQLWarning" not in done.stderr and "warnings.warn" not in done.stderr


def test_a_stream_that_cannot_write_the_bars_gets_the_numbers(tmp_path):
    """stdout in ASCII (an old locale, PYTHONIOENCODING=ascii): the bars become '?', where
    the first one had raised UnicodeEncodeError as an internal error."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "PYTHONPATH": str(ROOT),
           "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "diagql", "--model", "tests.models:trained_mlp",
                           "--data", "tests.models:digits", "--no-cache", "-e",
                           "TOPK 2 NEURONS IN head"], cwd=ROOT, env=env, capture_output=True,
                          text=True, encoding="ascii", errors="strict")
    assert done.returncode == 0, done.stderr
    assert "head[" in done.stdout and "?" in done.stdout


def test_weights_named_for_a_model_that_has_no_name_say_how_to_give_them():
    """With one unnamed --model, --weights other=PATH had said 'models are None'."""
    from diagql.errors import DiagQLError
    from diagql.shell.loading import load_models

    with pytest.raises(DiagQLError, match=r"there is no --model other=\.\.\.; the one model is "
                                          r"unnamed: --weights PATH"):
        load_models(["tests.models:trained_mlp"], ["other=w.pt"])


def test_a_reader_that_closes_the_pipe_ends_it_as_sigpipe_does():
    """``diagql ... | head -1`` had exited 1, a user error's status, failing `set -o pipefail`
    scripts (sweep SX11); no traceback either way."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    script = "; ".join(["AVG NEURONS IN head"] * 400)  # more than a pipe buffer holds
    with subprocess.Popen([sys.executable, "-m", "diagql", "--model", "tests.models:trained_mlp",
                           "--data", "tests.models:digits", "--no-cache", "--no-progress",
                           "--format", "csv", "-e", script], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout.readline().startswith(b"neuron")
        process.stdout.close()
        status = process.wait(timeout=300)
        errors = process.stderr.read().decode()
    assert status == 141 and "Traceback" not in errors, (status, errors)
