"""Feature extractors and matchers behind one interface.

Extractors: ``extract(image) -> {"keypoints" (N,2) x,y px, "scores" (N,),
"descriptors" (N,D), "image_size" (W,H)}``.
Matchers: ``match(feats0, feats1) -> {"matches" (K,2), "scores" (K,)}``.
"""
