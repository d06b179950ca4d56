"""The console commands (acmoe-pretrain, acmoe-launch, acmoe-eval, ...): parse, plan, refuse, launch."""
