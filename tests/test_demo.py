"""``diffrt demo`` end to end on a small grid (CPU): the grids are written and the table is sane."""
import math

import torch
from diffrt.runtime import cli, demo
from PIL import Image


def test_demo_writes_grids_and_a_table(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "--device", "cpu", "--reference-steps", "10", "--fast-steps",
                     "5"]) == 0
    printed = capsys.readouterr().out
    assert "ms/image" in printed and "speedup" in printed and "accuracy" in printed
    grids = sorted(tmp_path.glob("grid-*.png"))
    assert len(grids) == 2
    for path in grids:
        image = Image.open(path)
        assert image.size == (10 * 16 * 4, 16 * 4) and image.mode == "L"
        assert len(set(image.tobytes())) > 10, f"{path.name} is nearly blank"


def test_demo_rows_compare_against_the_reference(tmp_path):
    rows = demo.run_demo(tmp_path, rows=1, device="cpu", reference_steps=10, fast_steps=5)
    reference, fast = rows
    assert reference["speedup"] == 1.0 and math.isinf(reference["psnr_vs_reference"])
    assert reference["configuration"] == "reference fp32 (dpmpp-2m, 10 steps, PyTorch step)"
    assert 0 < fast["psnr_vs_reference"] < math.inf
    assert fast["ms_per_image"] > 0 and fast["speedup"] > 0
    for row in rows:
        assert row["class_accuracy"] >= 0.7, f"{row['configuration']}: accuracy {row['class_accuracy']}"


def test_save_grid_lays_out_rows(tmp_path):
    images = torch.linspace(-1, 1, 12).reshape(12, 1, 1, 1).expand(12, 1, 2, 3)
    demo.save_grid(images, tmp_path / "g.png", columns=5, scale=1)
    pixels = torch.frombuffer(bytearray(Image.open(tmp_path / "g.png").tobytes()), dtype=torch.uint8).reshape(6, 15)
    assert pixels[0, 0] == 0 and pixels[2, 10] == round((images[8, 0, 0, 0].item() + 1) * 127.5)  # row 1, column 3
    assert pixels[4:, 10:].max() == 0  # cells past the last image stay black
