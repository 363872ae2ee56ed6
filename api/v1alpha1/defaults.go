package v1alpha1

import (
	"time"

	"k8s.io/apimachinery/pkg/util/intstr"
)

// Defaults are applied when the spec is read, never written back, so GitOps
// tools see exactly what was committed. These helpers are the one place the
// defaults live.

// Default values of optional fields.
const (
	DefaultBake        = 5 * time.Minute
	DefaultNodeBake    = time.Minute
	DefaultRetireAfter = time.Minute
	// DefaultProgressDeadline bounds how long a wave may take to move.
	DefaultProgressDeadline = 10 * time.Minute
	// DefaultNodeSoak is the soak of every node wave after the canary one:
	// none beyond the wait for a clean query window (SLO gates).
	DefaultNodeSoak     = time.Duration(0)
	DefaultInterval     = 30 * time.Second
	DefaultFailureLimit = int32(2)
	// DefaultInconclusiveLimit: the sixth inconclusive check in a row holds
	// the rollout as Degraded.
	DefaultInconclusiveLimit = int32(5)
	DefaultMaxUnavailable    = "10%"
	DefaultSVIDTTL           = time.Hour
)

// EffectiveMode is the mode with its default (Ambient).
func (d DataplaneSpec) EffectiveMode() DataplaneMode {
	if d.Mode == "" {
		return ModeAmbient
	}
	return d.Mode
}

// EffectiveRedirection is the redirection with its default (EBPF in Ambient,
// none in Sidecar).
func (d DataplaneSpec) EffectiveRedirection() Redirection {
	if d.EffectiveMode() != ModeAmbient {
		return ""
	}
	if d.Redirection == "" {
		return RedirectionEBPF
	}
	return d.Redirection
}

// EffectiveKernelFallback is the kernel fallback with its default (IPTables).
func (d DataplaneSpec) EffectiveKernelFallback() KernelFallback {
	if d.KernelFallback == "" {
		return FallbackIPTables
	}
	return d.KernelFallback
}

// EffectiveWaves is the namespace waves with their default (["100%"]).
func (n NamespaceRolloutSpec) EffectiveWaves() []string {
	if len(n.Waves) == 0 {
		return []string{"100%"}
	}
	return n.Waves
}

// EffectiveBake is the bake time with its default (5m).
func (n NamespaceRolloutSpec) EffectiveBake() time.Duration {
	if n.Bake == nil {
		return DefaultBake
	}
	return n.Bake.Duration
}

// EffectiveMaxUnavailable is the node wave bound with its default (10%).
func (n NodeRolloutSpec) EffectiveMaxUnavailable() intstr.IntOrString {
	if n.MaxUnavailable == nil {
		return intstr.FromString(DefaultMaxUnavailable)
	}
	return *n.MaxUnavailable
}

// EffectiveBake is the canary node wave's bake time with its default (1m).
func (n NodeRolloutSpec) EffectiveBake() time.Duration {
	if n.Bake == nil {
		return DefaultNodeBake
	}
	return n.Bake.Duration
}

// EffectiveAutomatic is whether new patch releases are followed, with its
// default (true).
func (u UpgradeSpec) EffectiveAutomatic() bool {
	return u.Automatic == nil || *u.Automatic
}

// EffectiveMinor is whether new minor releases are followed, with its
// default (Manual).
func (u UpgradeSpec) EffectiveMinor() UpgradePolicy {
	if u.Minor == "" {
		return UpgradeManual
	}
	return u.Minor
}

// EffectiveRetireAfter is the retirement grace period with its default (1m).
func (r RolloutSpec) EffectiveRetireAfter() time.Duration {
	if r.RetireAfter == nil {
		return DefaultRetireAfter
	}
	return r.RetireAfter.Duration
}

// EffectiveProgressDeadline is how long a wave may take to move, with its
// default (10m).
func (r RolloutSpec) EffectiveProgressDeadline() time.Duration {
	if r.ProgressDeadline == nil {
		return DefaultProgressDeadline
	}
	return r.ProgressDeadline.Duration
}

// EffectiveSoak is the soak of every later node wave with its default (0s).
func (n NodeRolloutSpec) EffectiveSoak() time.Duration {
	if n.Soak == nil {
		return DefaultNodeSoak
	}
	return n.Soak.Duration
}

// EffectiveMTLS is the mesh-wide mTLS mode with its default (Permissive).
func (s SecuritySpec) EffectiveMTLS() MTLSMode {
	if s.MTLS == "" {
		return MTLSPermissive
	}
	return s.MTLS
}
