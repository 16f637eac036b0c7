"""A procedural world of coloured shapes where learning can be measured offline (issue 3, in progress).

``world.py`` renders images and captions deterministically from a seed. Some shapes are drawn in
pretraining images but never named in captions (textual inversion must find their word), and one never
appears at all (for DreamBooth to teach).
"""
