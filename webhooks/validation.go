// Package webhooks holds meshkeeper's admission: the validation of a Mesh
// spec (pure functions, usable anywhere), the validating webhook that runs it,
// and the self-managed serving certificates of the webhook server.
//
// Validation checks what the CRD schema cannot (PromQL, cron, URLs, SPIFFE
// trust domains, downgrades) and re-checks the schema's own rules cheaply, so
// an object that bypassed the schema still gets a clear answer. Every error
// names the field, says what was wrong and shows a value that would work.
package webhooks

import (
	"fmt"
	"math"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/validation/field"

	"github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/analysis"
	"github.com/meshkeeper/meshkeeper/internal/plan"
)

// Limits, mirroring the CRD schema where it has them.
const (
	maxVersionLength     = 32
	maxWaves             = 20
	maxCanaryNamespaces  = 64
	maxSLOs              = 32
	maxQueryLength       = 4096
	maxNumberLength      = 32
	maxAddressLength     = 2048
	maxWindows           = 16
	maxCronLength        = 128
	maxTrustDomainLength = 255
	maxWaypoints         = 256

	minInterval = 5 * time.Second
	maxFailures = 100
	// maxInconclusive mirrors spec.analysis.inconclusiveLimit's maximum.
	maxInconclusive = 1000
	maxWindow       = 168 * time.Hour
	minSVIDTTL      = time.Minute
	maxSVIDTTL      = 720 * time.Hour
	exampleVersion  = `"1.28" or "1.28.2"`
)

var (
	versionRE  = regexp.MustCompile(`^\d+\.\d+(\.\d+)?$`)
	percentRE  = regexp.MustCompile(`^([1-9][0-9]?|100)%$`)
	dnsLabelRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
	numberRE   = regexp.MustCompile(`^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$`)
	// degradationRE mirrors the schema's pattern of maxDegradation.
	degradationRE = regexp.MustCompile(`^[0-9]+(\.[0-9]+)?%$`)
)

// ValidateSpec checks a Mesh spec. Paths are rooted at "spec". It needs no
// client and no cluster: the same spec always gives the same errors.
func ValidateSpec(spec *v1alpha1.MeshSpec) field.ErrorList {
	p := field.NewPath("spec")
	if spec == nil {
		return field.ErrorList{field.Required(p, "a Mesh needs a spec, at least spec.version, e.g. version: \"1.28\"")}
	}
	var errs field.ErrorList
	errs = append(errs, validateVersion(spec.Version, p.Child("version"))...)
	errs = append(errs, validateDataplane(&spec.Dataplane, p.Child("dataplane"))...)
	errs = append(errs, validateWaypoints(spec.Waypoints, p.Child("waypoints"))...)
	errs = append(errs, validateIdentity(&spec.Identity, p.Child("identity"))...)
	errs = append(errs, validateSecurity(&spec.Security, p.Child("security"))...)
	errs = append(errs, validateRollout(&spec.Rollout, p.Child("rollout"))...)
	errs = append(errs, validateAnalysis(spec.Analysis, p.Child("analysis"))...)
	errs = append(errs, validateUpgrade(&spec.Upgrade, p.Child("upgrade"))...)
	return errs
}

// ValidateDowngrade applies the one downgrade rule (plan.CheckDowngrade),
// the same the planner applies: one minor back from the installed version is
// a canary rollout to the older release; more than one minor back, or across
// a major version, is refused naming the path. An empty installed version
// (nothing installed yet), a version that does not parse (ValidateSpec
// reports it) and any upgrade are fine.
func ValidateDowngrade(version, installed string) *field.Error {
	if err := plan.CheckDowngrade(version, installed); err != nil {
		return field.Invalid(field.NewPath("spec", "version"), version, err.Error())
	}
	return nil
}

type semver struct{ major, minor uint64 }

// parseVersion parses MAJOR.MINOR[.PATCH]; each number must fit in 32 bits.
func parseVersion(s string) (semver, bool) {
	if len(s) > maxVersionLength || !versionRE.MatchString(s) {
		return semver{}, false
	}
	parts := strings.Split(s, ".")
	var nums [3]uint64
	for i, part := range parts {
		n, err := strconv.ParseUint(part, 10, 32)
		if err != nil {
			return semver{}, false
		}
		nums[i] = n
	}
	return semver{major: nums[0], minor: nums[1]}, true
}

func validateVersion(v string, p *field.Path) field.ErrorList {
	switch {
	case v == "":
		return field.ErrorList{field.Required(p, "set the mesh version to run, e.g. version: \"1.28\" (newest patch) or \"1.28.2\"")}
	case len(v) > maxVersionLength:
		return field.ErrorList{hint(field.TooLong(p, v, maxVersionLength), "e.g. "+exampleVersion)}
	}
	if _, ok := parseVersion(v); !ok {
		return field.ErrorList{field.Invalid(p, v, "must be MAJOR.MINOR or MAJOR.MINOR.PATCH with numbers below 2^32 and no \"v\" prefix, e.g. "+exampleVersion)}
	}
	return nil
}

// validateSecurity re-checks the schema's enum. No cross-field rule: Strict
// holds in both dataplane modes (sidecars and ztunnel both speak Istio
// mTLS), and its timing against rollouts is the controller's to keep, not
// something a spec can get wrong.
func validateSecurity(s *v1alpha1.SecuritySpec, p *field.Path) field.ErrorList {
	switch s.MTLS {
	case "", v1alpha1.MTLSPermissive, v1alpha1.MTLSStrict:
		return nil
	}
	return field.ErrorList{hint(field.NotSupported(p.Child("mtls"), s.MTLS, []v1alpha1.MTLSMode{v1alpha1.MTLSPermissive, v1alpha1.MTLSStrict}),
		"Permissive accepts plaintext too (the default, e.g. during a migration); Strict requires mTLS mesh-wide once no rollout runs")}
}

func validateDataplane(d *v1alpha1.DataplaneSpec, p *field.Path) field.ErrorList {
	var errs field.ErrorList
	switch d.Mode {
	case "", v1alpha1.ModeAmbient, v1alpha1.ModeSidecar:
	default:
		errs = append(errs, field.NotSupported(p.Child("mode"), d.Mode, []v1alpha1.DataplaneMode{v1alpha1.ModeAmbient, v1alpha1.ModeSidecar}))
	}
	switch d.Redirection {
	case "", v1alpha1.RedirectionEBPF, v1alpha1.RedirectionIPTables:
	default:
		errs = append(errs, field.NotSupported(p.Child("redirection"), d.Redirection, []v1alpha1.Redirection{v1alpha1.RedirectionEBPF, v1alpha1.RedirectionIPTables}))
	}
	switch d.KernelFallback {
	case "", v1alpha1.FallbackIPTables, v1alpha1.FallbackBlock:
	default:
		errs = append(errs, field.NotSupported(p.Child("kernelFallback"), d.KernelFallback, []v1alpha1.KernelFallback{v1alpha1.FallbackIPTables, v1alpha1.FallbackBlock}))
	}
	ambient := d.EffectiveMode() == v1alpha1.ModeAmbient
	if d.Redirection != "" && !ambient {
		errs = append(errs, field.Invalid(p.Child("redirection"), string(d.Redirection),
			fmt.Sprintf("only valid with mode Ambient (mode is %s); remove redirection or set mode: Ambient", d.Mode)))
	}
	if d.KernelFallback != "" && (!ambient || (d.Redirection != "" && d.Redirection != v1alpha1.RedirectionEBPF)) {
		errs = append(errs, field.Invalid(p.Child("kernelFallback"), string(d.KernelFallback),
			"only applies to mode Ambient with redirection EBPF (nodes failing eBPF preflight fall back); remove kernelFallback"))
	}
	return errs
}

func validateWaypoints(ws []v1alpha1.WaypointSpec, p *field.Path) field.ErrorList {
	var errs field.ErrorList
	if len(ws) > maxWaypoints {
		errs = append(errs, hint(field.TooMany(p, len(ws), maxWaypoints), "declare at most 256 waypoints; a waypoint with for: All serves a whole namespace"))
	}
	seen := make(map[string]bool, len(ws))
	for i, w := range ws {
		wp := p.Index(i)
		errs = append(errs, validateDNSLabel(w.Namespace, wp.Child("namespace"), "a namespace name, e.g. shop")...)
		errs = append(errs, validateDNSLabel(w.Name, wp.Child("name"), "a Gateway name, e.g. waypoint")...)
		switch w.For {
		case "", v1alpha1.WaypointForService, v1alpha1.WaypointForWorkload, v1alpha1.WaypointForAll:
		default:
			errs = append(errs, field.NotSupported(wp.Child("for"), w.For, []v1alpha1.WaypointFor{v1alpha1.WaypointForService, v1alpha1.WaypointForWorkload, v1alpha1.WaypointForAll}))
		}
		key := w.Namespace + "/" + w.Name
		if seen[key] {
			errs = append(errs, hint(field.Duplicate(wp, key), "each namespace/name pair may appear once; remove the repeated entry"))
		}
		seen[key] = true
	}
	return errs
}

func validateDNSLabel(s string, p *field.Path, what string) field.ErrorList {
	if s == "" {
		return field.ErrorList{field.Required(p, "must be "+what)}
	}
	if len(s) > validation.DNS1123LabelMaxLength {
		return field.ErrorList{hint(field.TooLong(p, s, validation.DNS1123LabelMaxLength), "must be "+what)}
	}
	if !dnsLabelRE.MatchString(s) {
		return field.ErrorList{field.Invalid(p, s, "must be "+what+": lowercase letters, digits and '-', starting and ending with a letter or digit")}
	}
	return nil
}

func validateIdentity(id *v1alpha1.IdentitySpec, p *field.Path) field.ErrorList {
	s := id.Spire
	if s == nil {
		return nil
	}
	p = p.Child("spire")
	var errs field.ErrorList
	td := p.Child("trustDomain")
	switch {
	case s.TrustDomain == "":
		if s.Enabled {
			errs = append(errs, field.Required(td, "required when SPIRE is enabled: the SPIFFE trust domain, e.g. trustDomain: example.org"))
		}
	default:
		errs = append(errs, validateTrustDomain(s.TrustDomain, td)...)
	}
	if s.SVIDTTL != nil {
		ttl := s.SVIDTTL.Duration
		if ttl < minSVIDTTL || ttl > maxSVIDTTL {
			errs = append(errs, field.Invalid(p.Child("svidTTL"), s.SVIDTTL.Duration.String(),
				fmt.Sprintf("must be between %s and %s, e.g. svidTTL: 1h", shortDuration(minSVIDTTL), shortDuration(maxSVIDTTL))))
		}
	}
	return errs
}

// validateTrustDomain follows the SPIFFE ID spec: a trust domain name is made
// of lowercase letters, digits, dots, dashes and underscores.
func validateTrustDomain(s string, p *field.Path) field.ErrorList {
	if len(s) > maxTrustDomainLength {
		return field.ErrorList{hint(field.TooLong(p, s, maxTrustDomainLength), "e.g. trustDomain: example.org")}
	}
	if rest, ok := strings.CutPrefix(s, "spiffe://"); ok {
		return field.ErrorList{field.Invalid(p, s, fmt.Sprintf("give the trust domain without the spiffe:// scheme, e.g. trustDomain: %s", strings.SplitN(rest, "/", 2)[0]))}
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_' {
			continue
		}
		caseHint := ""
		if c >= 'A' && c <= 'Z' {
			caseHint = " (SPIFFE trust domains are lowercase)"
		}
		return field.ErrorList{field.Invalid(p, s, fmt.Sprintf(
			"not a valid SPIFFE trust domain: character %q at offset %d is not allowed%s; use lowercase letters, digits, '.', '-' and '_', e.g. example.org", c, i, caseHint))}
	}
	if strings.Trim(s, ".") == "" {
		return field.ErrorList{field.Invalid(p, s, "not a valid SPIFFE trust domain: it needs at least one letter or digit, e.g. example.org")}
	}
	return nil
}

func validateRollout(r *v1alpha1.RolloutSpec, p *field.Path) field.ErrorList {
	var errs field.ErrorList
	if mu := r.Nodes.MaxUnavailable; mu != nil {
		errs = append(errs, validateMaxUnavailable(mu, p.Child("nodes", "maxUnavailable"))...)
	}
	np := p.Child("namespaces")
	errs = append(errs, validateCanaryNamespaces(r.Namespaces.Canary, np.Child("canary"))...)
	errs = append(errs, validateWaves(r.Namespaces.Waves, np.Child("waves"))...)
	if b := r.Namespaces.Bake; b != nil && b.Duration < 0 {
		errs = append(errs, field.Invalid(np.Child("bake"), b.Duration.String(), "must not be negative; use 0s for no soak or a duration such as 5m"))
	}
	return errs
}

func validateMaxUnavailable(mu *intstr.IntOrString, p *field.Path) field.ErrorList {
	const muHint = "must be a count of at least 1 or a percentage from 1% to 100%, e.g. 10% or 2"
	switch mu.Type {
	case intstr.Int:
		if mu.IntVal < 1 {
			return field.ErrorList{field.Invalid(p, int64(mu.IntVal), muHint)}
		}
	case intstr.String:
		if !percentRE.MatchString(mu.StrVal) {
			detail := muHint
			if _, err := strconv.Atoi(mu.StrVal); err == nil {
				detail += fmt.Sprintf(" (a count is written without quotes: maxUnavailable: %s)", mu.StrVal)
			}
			return field.ErrorList{field.Invalid(p, mu.StrVal, detail)}
		}
	default:
		return field.ErrorList{field.Invalid(p, mu.String(), muHint)}
	}
	return nil
}

func validateCanaryNamespaces(ns []string, p *field.Path) field.ErrorList {
	var errs field.ErrorList
	if len(ns) > maxCanaryNamespaces {
		errs = append(errs, hint(field.TooMany(p, len(ns), maxCanaryNamespaces), "list at most 64 canary namespaces; the rest move with the waves"))
	}
	seen := make(map[string]bool, len(ns))
	for i, n := range ns {
		if seen[n] {
			errs = append(errs, hint(field.Duplicate(p.Index(i), n), "list each canary namespace once, e.g. [shop-staging, shop-qa]"))
			continue
		}
		seen[n] = true
		errs = append(errs, validateDNSLabel(n, p.Index(i), "a namespace name, e.g. shop-staging")...)
	}
	return errs
}

const wavesExample = `e.g. ["10%", "50%", "100%"]`

func validateWaves(waves []string, p *field.Path) field.ErrorList {
	if len(waves) == 0 {
		return nil
	}
	var errs field.ErrorList
	if len(waves) > maxWaves {
		errs = append(errs, hint(field.TooMany(p, len(waves), maxWaves), "use at most 20 waves, "+wavesExample))
	}
	prev, prevOK := 0, true
	for i, w := range waves {
		wp := p.Index(i)
		if !percentRE.MatchString(w) {
			errs = append(errs, field.Invalid(wp, w, "must be a percentage from 1% to 100% written like \"25%\"; waves are cumulative, "+wavesExample))
			prevOK = false
			continue
		}
		n, _ := strconv.Atoi(strings.TrimSuffix(w, "%")) // the pattern guarantees 1..100
		if prevOK && i > 0 && n <= prev {
			errs = append(errs, field.Invalid(wp, w, fmt.Sprintf(
				"waves must be strictly increasing: %s comes after %d%%; each wave is the cumulative share of namespaces moved so far, %s", w, prev, wavesExample)))
		}
		prev, prevOK = n, true
	}
	if last := waves[len(waves)-1]; last != "100%" && percentRE.MatchString(last) {
		errs = append(errs, field.Invalid(p.Index(len(waves)-1), last,
			"the last wave must be \"100%\" so every namespace moves, "+wavesExample))
	}
	return errs
}

func validateAnalysis(a *v1alpha1.AnalysisSpec, p *field.Path) field.ErrorList {
	if a == nil {
		return nil
	}
	var errs field.ErrorList
	if a.Prometheus != nil {
		errs = append(errs, validatePrometheusAddress(a.Prometheus.Address, p.Child("prometheus", "address"))...)
	} else if len(a.SLOs) > 0 {
		errs = append(errs, field.Required(p.Child("prometheus", "address"),
			"required when spec.analysis.slos is set: SLOs are read from Prometheus, e.g. address: http://prometheus.monitoring:9090"))
	}
	if a.Interval != nil && a.Interval.Duration < minInterval {
		errs = append(errs, field.Invalid(p.Child("interval"), a.Interval.Duration.String(), "must be at least 5s, e.g. 30s"))
	}
	if fl := a.FailureLimit; fl != nil && (*fl < 0 || *fl > maxFailures) {
		errs = append(errs, field.Invalid(p.Child("failureLimit"), int64(*fl), "must be from 0 to 100 failed checks tolerated before rollback, e.g. 2"))
	}
	if il := a.InconclusiveLimit; il != nil && (*il < 0 || *il > maxInconclusive) {
		errs = append(errs, field.Invalid(p.Child("inconclusiveLimit"), int64(*il),
			"must be from 0 to 1000 inconclusive checks tolerated before the rollout holds as Degraded, e.g. 5"))
	}
	sp := p.Child("slos")
	if len(a.SLOs) > maxSLOs {
		errs = append(errs, hint(field.TooMany(sp, len(a.SLOs), maxSLOs), "keep at most 32 SLOs; combine related checks in one query"))
	}
	names := make(map[string]bool, len(a.SLOs))
	for i := range a.SLOs {
		slo := &a.SLOs[i]
		ip := sp.Index(i)
		errs = append(errs, validateDNSLabel(slo.Name, ip.Child("name"), "an SLO name, e.g. l4-success")...)
		if slo.Name != "" && names[slo.Name] {
			errs = append(errs, hint(field.Duplicate(ip.Child("name"), slo.Name), "each SLO needs its own name, e.g. l4-success and l4-latency"))
		}
		names[slo.Name] = true
		errs = append(errs, validateSLOBounds(slo, ip)...)
		errs = append(errs, validateBaseline(slo, ip)...)
		errs = append(errs, validateQuery(slo.Query, ip.Child("query"))...)
	}
	return errs
}

func validatePrometheusAddress(addr string, p *field.Path) field.ErrorList {
	const example = "e.g. http://prometheus.monitoring:9090"
	if addr == "" {
		return field.ErrorList{field.Required(p, "the base URL of Prometheus, "+example)}
	}
	if len(addr) > maxAddressLength {
		return field.ErrorList{hint(field.TooLong(p, addr, maxAddressLength), example)}
	}
	if strings.ContainsFunc(addr, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
		return field.ErrorList{field.Invalid(p, addr, "must not contain spaces or control characters; "+example)}
	}
	u, err := url.Parse(addr)
	if err != nil {
		return field.ErrorList{field.Invalid(p, addr, fmt.Sprintf("not a URL (%v); %s", unwrapURLError(err), example))}
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return field.ErrorList{field.Invalid(p, addr, "must be an http:// or https:// URL, "+example)}
	}
	if u.Host == "" || u.Hostname() == "" {
		return field.ErrorList{field.Invalid(p, addr, "the URL has no host; "+example)}
	}
	if port := u.Port(); port != "" {
		if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
			return field.ErrorList{field.Invalid(p, addr, fmt.Sprintf("port %q is not a port number from 1 to 65535; %s", port, example))}
		}
	}
	if u.User != nil {
		return field.ErrorList{field.Invalid(p, addr, "must not carry credentials in the URL; "+example)}
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return field.ErrorList{field.Invalid(p, addr, "must be a base URL without query or fragment; "+example)}
	}
	return nil
}

func unwrapURLError(err error) error {
	if ue, ok := err.(*url.Error); ok {
		return ue.Err
	}
	return err
}

// validateBaseline checks maxDegradation and better.
func validateBaseline(slo *v1alpha1.SLO, p *field.Path) field.ErrorList {
	var errs field.ErrorList
	if slo.MaxDegradation != nil {
		if len(*slo.MaxDegradation) > maxNumberLength {
			errs = append(errs, hint(field.TooLong(p.Child("maxDegradation"), *slo.MaxDegradation, maxNumberLength), `e.g. "1%"`))
		} else if _, err := analysis.ParseDegradation(*slo.MaxDegradation); err != nil || !degradationRE.MatchString(*slo.MaxDegradation) {
			errs = append(errs, field.Invalid(p.Child("maxDegradation"), *slo.MaxDegradation,
				`must be a percentage of the baseline's value, e.g. "1%" or "0.5%"`))
		}
	}
	switch slo.Better {
	case "", v1alpha1.BetterHigher, v1alpha1.BetterLower:
	default:
		errs = append(errs, field.NotSupported(p.Child("better"), slo.Better, []string{string(v1alpha1.BetterHigher), string(v1alpha1.BetterLower)}))
	}
	if slo.Better != "" && slo.MaxDegradation == nil {
		errs = append(errs, field.Invalid(p.Child("better"), slo.Better, `only applies with maxDegradation; remove better or add maxDegradation: "1%"`))
	}
	return errs
}

func validateSLOBounds(slo *v1alpha1.SLO, p *field.Path) field.ErrorList {
	if slo.Min == nil && slo.Max == nil {
		return field.ErrorList{field.Required(p.Child("min"), "an SLO needs min, max or both, e.g. min: \"0.99\"")}
	}
	var errs field.ErrorList
	lo, loOK := parseBound(slo.Min, p.Child("min"), &errs)
	hi, hiOK := parseBound(slo.Max, p.Child("max"), &errs)
	if loOK && hiOK && lo > hi {
		errs = append(errs, field.Invalid(p.Child("min"), *slo.Min, fmt.Sprintf(
			"min is above max %q, so no value could pass; swap them or lower min", *slo.Max)))
	}
	return errs
}

func parseBound(s *string, p *field.Path, errs *field.ErrorList) (float64, bool) {
	if s == nil {
		return 0, false
	}
	const numberHint = `must be a finite decimal number in quotes, e.g. "0.99" or "2.5e-3"`
	if len(*s) > maxNumberLength {
		*errs = append(*errs, hint(field.TooLong(p, *s, maxNumberLength), `e.g. "0.99"`))
		return 0, false
	}
	if !numberRE.MatchString(*s) {
		*errs = append(*errs, field.Invalid(p, *s, numberHint))
		return 0, false
	}
	v, err := strconv.ParseFloat(*s, 64)
	if err != nil || math.IsNaN(v) || math.IsInf(v, 0) {
		*errs = append(*errs, field.Invalid(p, *s, numberHint))
		return 0, false
	}
	return v, true
}

func validateUpgrade(u *v1alpha1.UpgradeSpec, p *field.Path) field.ErrorList {
	var errs field.ErrorList
	wp := p.Child("windows")
	if len(u.Windows) > maxWindows {
		errs = append(errs, hint(field.TooMany(wp, len(u.Windows), maxWindows), `use at most 16 windows; one cron can cover several days, e.g. "0 2 * * 1-5"`))
	}
	for i := range u.Windows {
		w := &u.Windows[i]
		ip := wp.Index(i)
		errs = append(errs, validateCron(w.Cron, ip.Child("cron"))...)
		if d := w.Duration.Duration; d <= 0 || d > maxWindow {
			errs = append(errs, field.Invalid(ip.Child("duration"), d.String(),
				"must be more than 0 and at most 168h (one week): how long the window stays open, e.g. 4h"))
		}
	}
	return errs
}

// hint adds how to fix it to a generic field error.
func hint(e *field.Error, how string) *field.Error {
	if e.Detail == "" {
		e.Detail = how
	} else {
		e.Detail += "; " + how
	}
	return e
}

// shortDuration prints 720h0m0s as 720h and 1m0s as 1m.
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}
