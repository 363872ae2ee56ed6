// Package bundles holds meshkeeper's versioned bundles: one manifest per mesh
// release under catalog/ and the project's own Helm charts under charts/,
// shared by every release (releases differ only by values). Both trees are
// embedded so the operator never fetches a chart at run time; internal/bundle
// reads them through FS.
package bundles

import "embed"

// FS is the embedded catalog/ and charts/ trees, rooted so that
// "catalog/1.28.2.yaml" and "charts/istiod/Chart.yaml" are valid paths.
// "all:" keeps Helm's _helpers-style templates, which plain go:embed skips
// because their names start with "_".
//
//go:embed all:catalog all:charts
var FS embed.FS

// GatewayAPI is the Gateway API's standard-channel CRDs, exactly as the
// sigs.k8s.io/gateway-api module ships them (config/crd/standard, copied by
// `make manifests` from the version go.mod pins), under "gateway-api/".
// internal/gatewayapi installs them, never over a newer copy.
//
//go:embed gateway-api
var GatewayAPI embed.FS
