package webhooks

import (
	"fmt"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation/field"

	"github.com/meshkeeper/meshkeeper/internal/plan"
)

var cronFields = [5]struct{ name, allowed string }{
	{"minute", "0-59"},
	{"hour", "0-23"},
	{"day-of-month", "1-31"},
	{"month", "1-12 or JAN-DEC"},
	{"day-of-week", "0-6 or SUN-SAT"},
}

const cronExample = `use "minute hour day-of-month month day-of-week" in UTC, e.g. "0 2 * * 6" (02:00 every Saturday)`

func validateCron(spec string, p *field.Path) field.ErrorList {
	if strings.TrimSpace(spec) == "" {
		return field.ErrorList{field.Required(p, cronExample)}
	}
	if len(spec) > maxCronLength {
		return field.ErrorList{hint(field.TooLong(p, spec, maxCronLength), cronExample)}
	}
	if strings.HasPrefix(spec, "TZ=") || strings.HasPrefix(spec, "CRON_TZ=") {
		return field.ErrorList{field.Invalid(p, spec, "windows are always in UTC and take no time zone; remove the TZ= prefix and convert the time to UTC")}
	}
	if strings.HasPrefix(strings.TrimSpace(spec), "@") {
		return field.ErrorList{field.Invalid(p, spec, "descriptors such as @daily are not supported; "+cronExample)}
	}
	fields := strings.Fields(spec)
	if len(fields) != len(cronFields) {
		detail := fmt.Sprintf("has %d fields, a cron needs exactly 5; %s", len(fields), cronExample)
		if len(fields) == 6 {
			detail = "has 6 fields; seconds are not supported, drop the first field; " + cronExample
		}
		return field.ErrorList{field.Invalid(p, spec, detail)}
	}
	sched, err := plan.ParseCron(spec)
	if err != nil {
		return field.ErrorList{field.Invalid(p, spec, describeCronError(fields, err))}
	}
	if plan.CronNeverFires(sched) {
		return field.ErrorList{field.Invalid(p, spec, "never fires (the day-of-month does not exist in the chosen months, e.g. 30 2 for 30 February); "+cronExample)}
	}
	return nil
}

// describeCronError names every field that does not parse on its own (every
// other field replaced by "*").
func describeCronError(fields []string, whole error) string {
	var bad []string
	for i, f := range fields {
		probe := []string{"*", "*", "*", "*", "*"}
		probe[i] = f
		if _, err := plan.ParseCron(strings.Join(probe, " ")); err != nil {
			bad = append(bad, fmt.Sprintf("%s field %q is invalid (%v), allowed are %s with *, ',', '-' and '/'",
				cronFields[i].name, f, err, cronFields[i].allowed))
		}
	}
	if len(bad) == 0 {
		return fmt.Sprintf("%v; %s", whole, cronExample)
	}
	return strings.Join(bad, "; ") + "; " + cronExample
}
