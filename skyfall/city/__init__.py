"""City scale: many overlapping tiles of one city merged into one seamless scene. A ``city.json``
manifest (``skyfall.city.manifest``) lays a grid of cells over the city's local ENU frame; each cell
owns a *core* rectangle (the cores tile the city exactly) and is reconstructed as a tile that extends
a margin beyond its core. ``skyfall.city.merge`` crops every tile to its core, translates it into the
city frame and joins the results (Gaussian splats, DSMs), and marks the seams between cores so that
errors there can be reported apart from the interior.
"""
