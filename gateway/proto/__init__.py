"""Generated gRPC code for seqguard.v1 (proto/seqguard/v1/risk.proto); regenerate with proto/generate.sh."""
