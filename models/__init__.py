"""Feature extractors and matchers behind one interface.

Extractors: ``extract(image) -> {"keypoints" (N,2) x,y px, "scores" (N,),
"descriptors" (N,D), "image_size" (W,H)}``.
Matchers: ``match(feats0, feats1) -> {"matches" (K,2), "scores" (K,)}``.
"""

EXTRACTORS = ("superpoint", "superpointvo", "orb", "sift")
MATCHERS = ("superglue", "mnn")


def build_extractor(name: str, **kw):
    """'superpoint' | 'superpointvo' | 'orb' | 'sift' -> an extractor; ``kw`` go to its constructor.

    'superpointvo' is SuperPoint with the shipped ``weights/superpointvo_*.pth`` (fine-tuned on
    VO stability labels, ``python -m vo.train superpointvo``) unless ``weights=`` is given.

    Imports are lazy so the classical path never loads the networks.
    """
    key = name.lower()
    if key == "superpoint":
        from .superpoint import SuperPoint
        return SuperPoint(**kw)
    if key == "superpointvo":
        from .superpoint import SuperPoint
        from .weights import default_weights
        if kw.get("weights") is None:
            kw["weights"] = default_weights("superpointvo_*.pth")
        return SuperPoint(**kw)
    if key == "orb":
        from .classical import ORB
        return ORB(**kw)
    if key == "sift":
        from .classical import SIFT
        return SIFT(**kw)
    raise ValueError(f"unknown extractor {name!r}; choose one of {EXTRACTORS}")


def build_matcher(name: str, **kw):
    """'superglue' | 'mnn' -> a matcher; ``kw`` go to its constructor."""
    key = name.lower()
    if key == "superglue":
        from .superglue import SuperGlue
        return SuperGlue(**kw)
    if key in ("mnn", "nn", "mutual_nn"):
        from .nn_matcher import MutualNN
        return MutualNN(**kw)
    raise ValueError(f"unknown matcher {name!r}; choose one of {MATCHERS}")
