"""tools/contact_sheet.py: tiles on a checkerboard, in their cells, with their labels."""

from __future__ import annotations

from PIL import Image

from tools.contact_sheet import (BACKGROUND, CHECKER_DARK, CHECKER_LIGHT, CHECKER_SQUARE, LABEL_HEIGHT, MARGIN,
                                 contact_sheet)

SIDE = 64


def cell_origin(row: int, column: int) -> tuple[int, int]:
    return MARGIN + column * (SIDE + MARGIN), MARGIN + row * (SIDE + LABEL_HEIGHT + MARGIN)


def colours(image: Image.Image, box: tuple[int, int, int, int]) -> set[tuple[int, int, int]]:
    return {colour for _, colour in image.crop(box).getcolors(maxcolors=SIDE * SIDE * 4)}


def test_layers_sit_on_a_checkerboard_in_their_cells_with_labels():
    red = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    clear = Image.new("RGBA", (32, 32), (0, 0, 255, 0))
    half = Image.new("RGBA", (32, 16), (0, 0, 0, 128))  # wide: centred vertically in its square
    sheet = contact_sheet([[("red", red), ("clear", clear)], [None, ("half", half)]], tile_side=SIDE)
    assert sheet.mode == "RGB"
    assert sheet.size == (MARGIN + 2 * (SIDE + MARGIN), MARGIN + 2 * (SIDE + LABEL_HEIGHT + MARGIN))

    x, y = cell_origin(0, 0)
    assert colours(sheet, (x, y, x + SIDE, y + SIDE)) == {(255, 0, 0)}  # opaque: no checkerboard shows
    x, y = cell_origin(0, 1)
    assert colours(sheet, (x, y, x + SIDE, y + SIDE)) == {CHECKER_LIGHT, CHECKER_DARK}  # transparent
    assert sheet.getpixel((x, y)) == CHECKER_DARK and sheet.getpixel((x + CHECKER_SQUARE, y)) == CHECKER_LIGHT
    x, y = cell_origin(1, 1)
    top = y + SIDE // 4
    assert sheet.getpixel((x, y)) == BACKGROUND  # above the wide tile
    over_dark = Image.alpha_composite(Image.new("RGBA", (1, 1), CHECKER_DARK),
                                      Image.new("RGBA", (1, 1), (0, 0, 0, 128)))
    assert sheet.getpixel((x, top)) == over_dark.convert("RGB").getpixel((0, 0))  # black at half alpha

    x, y = cell_origin(1, 0)
    assert colours(sheet, (x, y, x + SIDE, y + SIDE + LABEL_HEIGHT)) == {BACKGROUND}  # the empty cell
    for row, column in ((0, 0), (0, 1), (1, 1)):
        x, y = cell_origin(row, column)
        label = colours(sheet, (x, y + SIDE, x + SIDE, y + SIDE + LABEL_HEIGHT))
        assert len(label) > 2  # text, antialiased, on the background
