from longhaul.synthetic import synthetic_trajectory as realistic_trajectory  # noqa: F401
