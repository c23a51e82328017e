"""FourRooms gridworlds (and any other ASCII grid) as finite MDPs, and the ``qworld/FourRooms-v0`` problem."""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from qworld_envs.finite import FiniteMDP
from qworld_envs.problems import FiniteEnvSpec, FiniteProblem, build_finite_problem

FOUR_ROOMS_ID = "qworld/FourRooms-v0"

# The paper's 11x11 map: wall row 5 and wall column 5, doorways (3,5), (7,5), (5,3), (5,8),
# 68 free cells. 'T' marks the teleport cells; they are ordinary cells outside the
# teleport variant.
FOUR_ROOMS_LAYOUT = """\
###########
#....#....#
#....#....#
#.........#
#...T#T...#
###.####.##
#...T#T...#
#.........#
#....#....#
#....#....#
###########
"""

VARIANTS = ("deterministic", "windy", "teleport")

# Action a moves by ACTION_DELTAS[a] in (row, col); rotating a by +-1 turns it 90 degrees.
ACTION_DELTAS = ((-1, 0), (0, 1), (1, 0), (0, -1))  # up, right, down, left
ACTION_NAMES = ("up", "right", "down", "left")

WALL, FREE, TELEPORT = "#", ".", "T"


def parse_layout(layout: str) -> np.ndarray:
    """Parse an ASCII grid into a ``[H, W]`` array of characters.

    Blank lines are dropped and each line is stripped, so indented triple-quoted
    strings work. Characters: '#' wall, '.' free, 'T' free teleport cell.

    Raises:
        ValueError: an unknown character, rows of unequal width, or no free cell.
    """
    rows = [line.strip() for line in layout.splitlines() if line.strip()]
    if not rows:
        raise ValueError("layout is empty")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"layout rows must have equal width, got widths {sorted(widths)}")
    grid = np.array([list(r) for r in rows])
    unknown = sorted(set(grid.ravel()) - {WALL, FREE, TELEPORT})
    if unknown:
        raise ValueError(f"layout has unknown characters {unknown}; use '#' wall, '.' free, 'T' teleport")
    if not (grid != WALL).any():
        raise ValueError("layout has no free cell")
    return grid


def _is_free(free: np.ndarray, r: int, c: int) -> bool:
    """Free cell test that treats everything outside the grid as wall."""
    H, W = free.shape
    return 0 <= r < H and 0 <= c < W and bool(free[r, c])


def find_doorways(free: np.ndarray) -> np.ndarray:
    """Doorway mask: a free cell with walls on two opposite sides and free cells on the other two.

    Args:
        free: ``[H, W]`` bool.

    Returns:
        ``[H, W]`` bool.
    """
    H, W = free.shape
    door = np.zeros_like(free)
    for r, c in zip(*np.nonzero(free)):
        up, down = _is_free(free, r - 1, c), _is_free(free, r + 1, c)
        left, right = _is_free(free, r, c - 1), _is_free(free, r, c + 1)
        door[r, c] = (up and down and not left and not right) or (left and right and not up and not down)
    return door


def find_rooms(room_cells: np.ndarray) -> np.ndarray:
    """Label 4-connected components of ``room_cells``.

    Args:
        room_cells: ``[H, W]`` bool (free cells minus doorways).

    Returns:
        ``[H, W]`` int, -1 outside rooms, rooms numbered 0.. in row-major order of
        their first cell.
    """
    H, W = room_cells.shape
    label = np.full((H, W), -1, dtype=np.int64)
    n = 0
    for r0, c0 in zip(*np.nonzero(room_cells)):
        if label[r0, c0] >= 0:
            continue
        label[r0, c0] = n
        queue = deque([(r0, c0)])
        while queue:
            r, c = queue.popleft()
            for dr, dc in ACTION_DELTAS:
                rr, cc = r + dr, c + dc
                if _is_free(room_cells, rr, cc) and label[rr, cc] < 0:
                    label[rr, cc] = n
                    queue.append((rr, cc))
        n += 1
    return label


def four_rooms(variant: str = "deterministic", layout: str | None = None) -> FiniteMDP:
    """FourRooms gridworld as a :class:`FiniteMDP`.

    ## Observation (state) space
    The free cells ('.' or 'T') of the layout, numbered in row-major order;
    ``coords[s] = (row, col)``. The default layout has 68 states.

    ## Action space
    4 actions: 0 up (row - 1), 1 right (col + 1), 2 down (row + 1), 3 left (col - 1).

    ## Dynamics (by ``variant``)
    - ``"deterministic"``: the agent moves one cell; a move into a wall (or off the
      grid) leaves it where it is. 'T' cells are ordinary cells.
    - ``"windy"``: the intended move with probability 1/2, otherwise the move rotated
      90 degrees either way (1/4 each); each of those moves stops at walls as above.
    - ``"teleport"``: deterministic moves, except that from a 'T' cell *any* action sends
      the agent to a uniformly random free cell of the diagonally opposite room (the
      room holding cell ``(H-1-r, W-1-c)``). The agent can enter and stand on a 'T'
      cell, so a safety problem can forbid those states.

    ## Rooms and doorways
    A doorway is a free cell with walls on two opposite sides and free cells on the
    other two; rooms are the 4-connected components of the free cells that are not
    doorways.

    ## Reward, start state, episode end
    None here: goal families (``qworld_envs.goals``) add rewards and terminal states,
    and the environments (gym and batched) choose start states.

    Args:
        variant: one of ``VARIANTS``.
        layout: ASCII grid ('#' wall, '.' free, 'T' free teleport cell); None for
            ``FOUR_ROOMS_LAYOUT``.

    Returns:
        The MDP; ``meta`` holds ``layout``, ``variant``, ``teleport_states``,
        ``doorway_states`` and ``rooms`` (a list of sorted state lists).

    Raises:
        ValueError: unknown variant, bad layout, or (teleport) a 'T' cell whose
            opposite cell is not in a room.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown FourRooms variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    layout = FOUR_ROOMS_LAYOUT if layout is None else layout
    grid = parse_layout(layout)
    H, W = grid.shape
    free = grid != WALL
    coords = np.argwhere(free)  # row-major order, the state numbering
    S = len(coords)
    state_of = np.full((H, W), -1, dtype=np.int64)
    state_of[free] = np.arange(S)

    doors = find_doorways(free)
    room_label = find_rooms(free & ~doors)
    num_rooms = int(room_label.max()) + 1
    rooms = [sorted(int(s) for s in state_of[room_label == k]) for k in range(num_rooms)]
    teleport_states = [int(s) for s in state_of[grid == TELEPORT]]
    doorway_states = [int(s) for s in state_of[doors]]

    def move(r: int, c: int, a: int) -> int:
        dr, dc = ACTION_DELTAS[a]
        return int(state_of[r + dr, c + dc]) if _is_free(free, r + dr, c + dc) else int(state_of[r, c])

    P = np.zeros((S, 4, S))
    for s, (r, c) in enumerate(coords):
        for a in range(4):
            if variant == "windy":
                P[s, a, move(r, c, a)] += 0.5
                P[s, a, move(r, c, (a + 1) % 4)] += 0.25
                P[s, a, move(r, c, (a - 1) % 4)] += 0.25
            else:
                P[s, a, move(r, c, a)] = 1.0

    if variant == "teleport":
        for s in teleport_states:
            r, c = coords[s]
            rr, cc = H - 1 - r, W - 1 - c
            if room_label[rr, cc] < 0:
                raise ValueError(
                    f"teleport cell {(int(r), int(c))}: the opposite cell {(int(rr), int(cc))} is not in a room"
                )
            targets = rooms[room_label[rr, cc]]
            P[s] = 0.0
            P[s][:, targets] = 1.0 / len(targets)

    meta = {
        "layout": "\n".join("".join(row) for row in grid),
        "variant": variant,
        "teleport_states": teleport_states,
        "doorway_states": doorway_states,
        "rooms": rooms,
    }
    return FiniteMDP(P, coords=coords, name=f"FourRooms-{variant}", meta=meta)


# kwargs of qworld/FourRooms-v0 besides problems.GOAL_KWARGS, with their defaults
FOUR_ROOMS_SPEC = FiniteEnvSpec(build_mdp=four_rooms, mdp_defaults={"variant": "deterministic", "layout": None})


def make_four_rooms_problem(**env_kwargs: Any) -> FiniteProblem:
    """The ``qworld/FourRooms-v0`` problem: kwargs ``variant`` ("deterministic"), ``layout``
    (None), ``goal_type`` ("indicator"), ``num_goals`` (None), ``goal_seed`` (0),
    ``goal_cells`` (None), ``max_episode_steps`` (100)."""
    return build_finite_problem(FOUR_ROOMS_ID, FOUR_ROOMS_SPEC, env_kwargs)
