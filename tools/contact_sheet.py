"""A contact sheet: labelled RGBA images in a grid, each on a checkerboard so its
transparency shows, for looking at a decomposition's layers at a glance. Pillow only.

Rows are lists of (label, image); None leaves a cell empty, so an edited layer can
sit under the layer it replaced.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

Cell = tuple[str, Image.Image] | None

DEFAULT_TILE_SIDE = 256   # each image is scaled to fit a square of this side
MARGIN = 12               # around and between the tiles
LABEL_HEIGHT = 22         # the line of text under each tile
LABEL_GAP = 4             # between a tile and its label
LABEL_FONT_SIZE = 14
CHECKER_SQUARE = 8        # side of one checkerboard square, in sheet pixels
CHECKER_LIGHT = (255, 255, 255)
CHECKER_DARK = (204, 204, 204)
BACKGROUND = (245, 245, 245)
TEXT = (20, 20, 20)


def checkerboard(size: tuple[int, int], square: int = CHECKER_SQUARE) -> Image.Image:
    """The usual pattern for "transparent here": light and dark squares."""
    board = Image.new("RGBA", size, CHECKER_LIGHT)
    draw = ImageDraw.Draw(board)
    width, height = size
    for y in range(0, height, square):
        for x in range((y // square % 2) * square, width, 2 * square):
            draw.rectangle((x, y, x + square - 1, y + square - 1), fill=CHECKER_DARK)
    return board


def tile(image: Image.Image, side: int) -> Image.Image:
    """The image scaled up or down to fit side x side, over a checkerboard."""
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    scaled = image.convert("RGBA").resize(size, Image.Resampling.LANCZOS)
    return Image.alpha_composite(checkerboard(size), scaled)


def contact_sheet(rows: list[list[Cell]], tile_side: int = DEFAULT_TILE_SIDE) -> Image.Image:
    """One RGB image with every cell's image on a checkerboard and its label beneath.
    Cells are as large as the largest tile: the layers of one job share one size, so
    their tiles fill the cells."""
    tiles = [[None if cell is None else (cell[0], tile(cell[1], tile_side)) for cell in row] for row in rows]
    pictures = [cell[1] for row in tiles for cell in row if cell is not None]
    tile_width, tile_height = max(p.width for p in pictures), max(p.height for p in pictures)
    cell_width, cell_height = tile_width + MARGIN, tile_height + LABEL_HEIGHT + MARGIN
    columns = max(len(row) for row in rows)
    sheet = Image.new("RGB", (MARGIN + columns * cell_width, MARGIN + len(rows) * cell_height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=LABEL_FONT_SIZE)
    for row_index, row in enumerate(tiles):
        for column, cell in enumerate(row):
            if cell is None:
                continue
            label, picture = cell
            left, top = MARGIN + column * cell_width, MARGIN + row_index * cell_height
            # Centred in its cell, so a tile of another aspect still lines up.
            sheet.paste(picture.convert("RGB"), (left + (tile_width - picture.width) // 2,
                                                 top + (tile_height - picture.height) // 2))
            draw.text((left, top + tile_height + LABEL_GAP), label, fill=TEXT, font=font)
    return sheet
