"""What a hospital reads about its own folder: ``fedcare site check`` reads as training
reads (every image decoded, dataset.toml's keys checked, the run's suppression and mode),
and each message names the file line, the key or the column as the staff will find it."""
import json

import numpy as np
import pandas as pd
import pytest

from fedcare.client.check import check_folder, render
from fedcare.config import RunConfig
from fedcare.errors import ConfigError, DataError
from fedcare.models.families import prepare
from fedcare.models.sitedata import Contract, Feature, describe

from sitefolders import abstracts_sites, breast_arrays, breast_png, write_toml

TAB = Contract(labels=("no", "yes"), features=(Feature("age"), Feature("sex", ("f", "m"))))


def _site(root, table: str, extra="", name="records.csv", fmt="csv"):
    folder = write_toml(root, f'dataset_id = "x"\nfamily = "tabular"\nformat = "{fmt}"\nfiles = ["{name}"]\n' + extra)
    (folder / name).write_text(table)
    return folder


def _error(folder, contract=TAB):
    with pytest.raises((DataError, ConfigError)) as err:
        prepare(describe(folder), contract)
    msg = str(err.value)
    assert "\n" not in msg and "np.str_" not in msg, msg
    return msg


def test_csv_lines_are_file_lines_when_a_quoted_field_spans_lines(tmp_path):
    rows = 'age,sex,label,note\n40,f,no,"first\nsecond\nthird"\n\n41,m,no,plain\n42,m,maybe,x\n'
    assert "records.csv line 7: unknown label 'maybe'" in _error(_site(tmp_path, rows))


def test_jsonl_lines_count_from_one_and_skip_blank_lines(tmp_path):
    lines = [json.dumps({"age": 40 + i, "sex": "f", "label": "no"}) for i in range(3)]
    lines.insert(1, "")
    lines.append(json.dumps({"age": 50, "sex": "x", "label": "no"}))
    folder = _site(tmp_path, "\n".join(lines) + "\n", name="r.jsonl", fmt="jsonl")
    assert "r.jsonl line 5: column 'sex' is 'x'" in _error(folder)


def test_a_bad_split_value_is_quoted_as_text(tmp_path):
    rows = "age,sex,label,part\n" + "".join(f"{40 + i},f,no,train\n" for i in range(3)) + "44,f,no,Validation\n"
    msg = _error(_site(tmp_path, rows, '[columns]\nsplit = "part"\n'))
    assert "records.csv line 5: split column 'part' is 'validation'" in msg


def test_who_names_a_missing_column(tmp_path):
    rows = "age,gender,label\n40,f,no\n"
    assert "the run's data contract names it" in _error(_site(tmp_path / "a", rows))
    msg = _error(_site(tmp_path / "b", rows, '[features]\nsex = "sexe"\n'))
    assert "no column 'sexe' (dataset.toml names it)" in msg


def test_categorical_codes_map_to_the_contracts_levels(tmp_path):
    rows = "age,gender,label\n" + "".join(f"{40 + i},{i % 2},{('no', 'yes')[i % 2]}\n" for i in range(10))
    folder = _site(tmp_path, rows, '[features]\nsex = { column = "gender", values = { "0" = "f", "1" = "m" } }\n')
    p = prepare(describe(folder), TAB)
    x = np.concatenate([p.split.train.tensors[0].numpy(), p.split.test.tensors[0].numpy()])
    assert len(np.unique(x[:, 1])) == 2                      # sex one-hot (m) from the codes
    bad = _site(tmp_path / "bad", rows.replace("\n41,1,", "\n41,2,"),
                '[features]\nsex = { column = "gender", values = { "0" = "f", "1" = "m" } }\n')
    assert "column 'gender' is '2'; feature sex takes f | m" in _error(bad)


@pytest.mark.parametrize("line, hint", [
    ('[colums]\nlabel = "num"\n', "unknown key colums; did you mean columns?"),
    ('[columns]\nidd = "patient"\n', "unknown key columns.idd; did you mean id?"),
    ('fromat = "csv"\n', "unknown key fromat; did you mean format?"),
])
def test_unknown_keys_in_dataset_toml_are_refused_with_the_closest_key(tmp_path, line, hint):
    folder = write_toml(tmp_path, 'dataset_id = "x"\nfamily = "tabular"\nformat = "csv"\nfiles = ["r.csv"]\n'
                        .replace('format = "csv"\n', "" if "fromat" in line else 'format = "csv"\n') + line)
    (folder / "r.csv").write_text("age,sex,label\n40,f,no\n")
    with pytest.raises(DataError, match=hint.replace("?", r"\?")):
        describe(folder)


@pytest.mark.parametrize("line, says", [
    ('[split]\ntest_fraction = "a fifth"\n', "a value has the wrong type"),
    ('[window]\ncenter = "soft tissue"\nwidth = 400\n', "a value has the wrong type"),
    ('labels = "no,yes"\n', "labels must be a list"),
])
def test_a_value_of_the_wrong_type_is_one_line_not_a_traceback(tmp_path, line, says):
    folder = write_toml(tmp_path, 'dataset_id = "x"\nfamily = "tabular"\nformat = "csv"\nfiles = ["r.csv"]\n' + line)
    (folder / "r.csv").write_text("age,sex,label\n40,f,no\n")
    with pytest.raises(DataError, match=says):
        describe(folder)


def test_a_run_without_labels_is_an_image_run(tmp_path):
    folder = breast_png(tmp_path / "png", n=8)
    with pytest.raises(ConfigError, match="an image run needs data.labels"):
        prepare(describe(folder), Contract())


def test_png_files_listed_in_a_table_read_without_a_layout_key(tmp_path):
    from PIL import Image

    folder = write_toml(tmp_path, 'dataset_id = "p"\nfamily = "image"\nformat = "png"\nfiles = ["labels.csv"]\n')
    images, labels = breast_arrays(8)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i}.png")
    pd.DataFrame({"file": [f"{i}.png" for i in range(8)], "label": ["ab"[int(y)] for y in labels]}).to_csv(
        folder / "labels.csv", index=False)
    summary = check_folder(str(folder), "image", RunConfig().apply_sets(["data.labels=a,b"]), 1)
    assert summary["layout"] == "table" and summary["rows"]["train"] + summary["rows"]["test"] == 8


def test_site_check_decodes_every_image(tmp_path):
    folder = breast_png(tmp_path / "png", n=8)
    victim = sorted(folder.rglob("*.png"))[3]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 60])            # the header reads; the pixels do not
    cfg = RunConfig().apply_sets(["data.labels=malignant,benign/normal"])
    prepare(describe(folder), Contract.from_config(cfg))   # what a round reads first: headers only
    with pytest.raises(DataError, match=victim.name):
        check_folder(str(folder), "image", cfg, 1)


def test_site_check_suppresses_as_the_run_does_and_names_what_leaves_in_head_mode(tmp_path):
    test_wards = ["A"] * 5 + ["B"] + ["C"] * 2              # test rows per ward
    rows = "age,sex,label,ward,part\n" + "".join(f"{40 + i},f,{('no', 'yes')[i % 2]},A,train\n" for i in range(10)) \
        + "".join(f"{50 + i},m,{('no', 'yes')[i % 2]},{w},test\n" for i, w in enumerate(test_wards))
    folder = _site(tmp_path / "tab", rows, '[columns]\nsplit = "part"\n[sensitive]\nward = "ward"\n')
    cfg = RunConfig().apply_sets(["data.labels=no,yes", "data.features=age,sex=f|m"])
    groups = check_folder(str(folder), "tabular", cfg, 2)["groups"]["ward"]
    # B alone (1 < 2) could be worked out from the total: C (2 rows) is suppressed with it
    assert {g: c["suppressed"] for g, c in groups.items()} == {"A": False, "B": True, "C": True}
    text = render(check_folder(str(abstracts_sites(tmp_path / "txt", per_site=6)[0]), "medical-abstracts",
                               RunConfig(), 1))
    assert "classifier head alone" in text and "the LoRA adapter and" not in text
    llm = render(check_folder(str(abstracts_sites(tmp_path / "llm", per_site=6)[0]), "medical-llm", RunConfig(), 1))
    assert "the LoRA adapter after local training" in llm
