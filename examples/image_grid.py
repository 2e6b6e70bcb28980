"""A PNG grid of small images, one row per example (the examples' pictures)."""
from __future__ import annotations


def save_image_grid(rows: list, path: str, row_titles: list, *, title: str = "", highlight_last: str = "",
                    stretch: bool = True, cell: tuple = (1.0, 1.2)) -> str:
    """rows: lists of (3, H, W) images, each stretched to [0, 1] (stretch) or already in it; row_titles
    over each row's first image; highlight_last: a label for the last column, framed in gold. Returns a
    line saying where the PNG went."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(cell[0] * columns, cell[1] * len(rows)), squeeze=False)
    for r, images in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(images):
                ax.axis("off")
                continue
            img = images[c].float()
            if stretch:
                img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-6)
            ax.imshow(img.permute(1, 2, 0).numpy())
            if highlight_last and c == columns - 1:
                for spine in ax.spines.values():
                    spine.set_edgecolor("gold")
                    spine.set_linewidth(3)
        axes[r, 0].set_title(row_titles[r], fontsize=7, loc="left")
    if highlight_last:
        axes[0, columns - 1].set_title(highlight_last, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"picture written to {path}"
