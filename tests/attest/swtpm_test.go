package attest

import "testing"

func TestSwtpmStory(t *testing.T) {
	runStory(t, newSwtpmLab(t))
}
