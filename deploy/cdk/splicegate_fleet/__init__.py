"""The splicegate fleet behind an AWS NLB and PrivateLink, as a CDK v2 app."""
