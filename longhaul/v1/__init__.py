"""Code generated from proto/longhaul/v1 by scripts/gen_proto.sh. Do not edit; regenerate."""
