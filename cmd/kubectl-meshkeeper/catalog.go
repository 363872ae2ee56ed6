package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/meshkeeper/meshkeeper/internal/bundle/oci"
)

// catalogPush publishes a bundles tree (catalog/ and charts/, laid out like
// bundles/) as a signed catalog artifact: what a release team runs when a
// new patch is ready, and what operators with --catalog-source then find.
func catalogPush(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("kubectl meshkeeper catalog push", flag.ContinueOnError)
	fs.SetOutput(out)
	dir := fs.String("d", "bundles", "the tree to publish: catalog/<version>.yaml and charts/")
	to := fs.String("to", "", "where: oci://host/repository:tag (required)")
	key := fs.String("key", "", "PEM ed25519 private key to sign with (openssl genpkey -algorithm ed25519) (required)")
	plainHTTP := fs.Bool("plain-http", false, "plain HTTP to the registry (a registry on loopback)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *to == "" || *key == "" {
		return errors.New("catalog push: --to and --key are required")
	}
	raw, err := os.ReadFile(*key)
	if err != nil {
		return err
	}
	priv, err := oci.ParsePrivateKey(raw)
	if err != nil {
		return fmt.Errorf("--key %s: %w", *key, err)
	}
	d, err := oci.Publish(ctx, *to, os.DirFS(*dir), priv, *plainHTTP)
	if err != nil {
		return fmt.Errorf("publish %s to %s: %w", *dir, *to, err)
	}
	fmt.Fprintf(out, "Published %s to %s (%s)\n", *dir, *to, d)
	return nil
}
