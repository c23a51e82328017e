"""Helpers shared by the learner tests (imported as ``helpers``: pytest puts tests/ on the path)."""

# A 3x5 room: 15 states, 15 indicator goals; short episodes keep the tests fast.
TINY_LAYOUT = """
#######
#.....#
#.....#
#.....#
#######
"""
TINY = {"layout": TINY_LAYOUT, "max_episode_steps": 20}


def flat(result: dict, prefix: str = "") -> dict:
    """Nested result dict -> {"a/b/c": value}, as Tune flattens it."""
    out = {}
    for k, v in result.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "/"))
        else:
            out[key] = v
    return out
