import numpy as np
import pytest

from geomoe.data.hsu import read_split, write_split

FIXTURE = """user_id,image_id,class,label
2/1,img_0001,Turdus migratorius,3
4/2,img_0002,Cardinalis cardinalis,7
"""


def test_reads_the_published_train_format(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(FIXTURE)
    split = read_split(path)
    assert split.user_ids == ["2/1", "4/2"] and split.image_ids == ["img_0001", "img_0002"]
    assert split.class_names[0] == "Turdus migratorius" and split.labels.tolist() == [3, 7]


def test_reads_the_published_test_format(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("image_id,class,label\nimg_9,Sitta,2\n")
    split = read_split(path)
    assert split.user_ids is None and split.labels.tolist() == [2]


def test_write_then_read_is_unchanged(tmp_path):
    path = tmp_path / "split.csv"
    cells, labels = np.array(["0/", "2/13"]), np.array([4, 1])
    write_split(path, cells, ["a", "b"], labels)
    split = read_split(path)
    assert split.user_ids == ["0/", "2/13"] and split.labels.tolist() == [4, 1]


@pytest.mark.parametrize(
    "text,message",
    [
        ("user,image_id,class,label\n", "header"),
        ("user_id,image_id,class,label\n0/,a,x\n", "row 2: 3 fields"),
        ("user_id,image_id,class,label\n0/,a,x,seven\n", "row 2, field 'label'"),
    ],
)
def test_bad_files_name_file_row_and_field(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        read_split(path)
    assert "bad.csv" in str(error.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_split(tmp_path / "nope.csv")
