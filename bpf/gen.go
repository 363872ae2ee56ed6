// Package bpf holds meshkeeper's node datapath: the eBPF C sources
// (redirect.c), vendored headers and the bpf2go output, which is committed so
// that building the agent needs no clang. Regenerate with `make generate-bpf`;
// `make verify-bpf` fails when the committed output is stale. See README.md.
package bpf

// The compiler is pinned to Debian bookworm's clang-14 (apt package clang-14)
// so that regeneration is byte-for-byte reproducible.
//go:generate go tool bpf2go -cc clang-14 -strip llvm-strip-14 -target bpfel -go-package bpf Redirect redirect.c -- -I. -mcpu=v3 -Wall -Werror
