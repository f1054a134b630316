"""Pure policies several layers share: the rotation planner and one disk's schedule."""
