"""Stage entry points (console scripts): precompute-teacher, train-student, inspect-losses."""
